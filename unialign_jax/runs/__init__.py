"""What a training run is, in one place: its config (`config`), that config resolved
against the folders it names (`resolve`), the models it builds and the seeds it draws
them from (`models`), and a finished work dir read back as models (`work_dir`). The
trainer, the samplers and the converters all go through it, never through config.json's
keys."""
