"""Training-time machinery around a prepared model: the schedules (QATSchedule, TransitionRateSchedule), the
dampening loss, oscillation reports, BatchNorm re-estimation, the companions (EMA, Quantization Correction) and
data-parallel support (DDP, FSDP2)."""
