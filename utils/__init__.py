"""The course's shared code: profiles, TinyWorld and its judge, models, data, training references,
checkers, claims and plots. Notebooks import from here; nothing here imports from a notebook.

Device rule, for every function here: it accepts a model on any device (CPU, CUDA), makes every
tensor it feeds a model on that model's device, and returns metrics as Python numbers or CPU
tensors (``tests/test_device.py`` checks this with a strict stand-in device on CPU-only torch).
Randomness rule: every seed goes through ``utils.config.course_seed`` (the ``COURSE_SEED`` knob).
"""

import logging
import warnings

# bitsandbytes (imported by transformers/peft when installed) warns on every CPU import that an
# optional Hub-downloaded kernel is missing, then falls back to its built-in one. Offline, that
# is expected; keep real errors, drop the noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# Without ipywidgets, tqdm's notebook bars fall back to text bars (which the course uses anyway,
# because they render in the book); the warning saying so would open every chapter.
warnings.filterwarnings("ignore", message="IProgress not found")
# peft 0.21 still reads a transformers property that transformers 5.24 has renamed.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
