"""run: executors for a Plan. `local` runs every stage in-process and is the reference."""

from edgesplit.runtime.common import RunResult, check_inputs, random_inputs
from edgesplit.runtime.local import LocalExecutor, run_whole_model

__all__ = ["LocalExecutor", "RunResult", "check_inputs", "random_inputs", "run_whole_model"]
