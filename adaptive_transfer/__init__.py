"""The jobs users run end to end: ``make resample`` (adaptive_transfer.resample)
and ``make demo`` (adaptive_transfer.demo), over the stages in beam_pipelines,
spark_jobs and trainer, with targets and sources from configs/."""
