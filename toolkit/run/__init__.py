"""The run lifecycle, written once: the run directory, its recorded history, fresh vs resume,
``ckpt_path``, interrupts, rank zero."""
