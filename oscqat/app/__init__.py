"""The oscqat application: `oscqat train | eval | export | toy`, data loading, built-in models, the QAT
optimizers and plots.

It uses only the library's public API (`import oscqat`), so that it reads as an example of a user's training
job; nothing in the library imports from here."""
