"""The names each choice of the library accepts, in one torch-free place: the modules that use them
import them from here, and the CLI builds its click choices from them."""

METHODS = ("mean", "pca")  # how the Master Key aggregates the differences (method.key)
SITES = ("layer_output", "post_attention")  # where a vector is added in a layer (method.vectors)
FORMS = ("additive", "paper")  # the two steering forms (method.steer)
EVAL_FORMS = FORMS + ("gated-lora",)  # what eval steers with: those two, and the gated edit (method.gate)
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")  # the convert route's tensor types (export.gguf)
OBJECTIVES = ("answer-start", "continuation")  # what the calibration matches (evaluation.calibrate)
EXPORT_DTYPES = ("float32", "bfloat16", "float16")  # what a checkpoint export is stored in (export.forms)
TASKS = ("gsm8k", "math")  # how eval reads and scores answers: numbers, or LaTeX by math-verify (evaluation.tasks)
