"""Imported first by every entry point, for its effect: the process settings that torch's libraries read when they
load (OpenMP's waiting policy, glibc's handling of freed memory), made before anything imports torch.

An import rather than a call between imports, so that the scripts' imports stay one plain block; see
`cpu_runtime.prepare_process` for what it decides and why. Library modules never import it.
"""

import sys

from torch_utils import cpu_runtime

cpu_runtime.prepare_process(sys.argv[1:])
