"""The oscqat application: `oscqat train | eval | toy`, data loading, built-in models and plots.

It uses only the library's public API (`import oscqat`), so that it reads as an example of a user's training
job; nothing in the library imports from here."""
