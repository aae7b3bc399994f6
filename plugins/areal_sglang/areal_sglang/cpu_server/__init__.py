"""Environment workarounds for running a real SGLang server on CPUs without Intel AMX.

This folder is put on ``PYTHONPATH`` of the SGLang server process that the plugin launches in
CPU mode, and of nothing else: the client never imports it. It holds

- ``sitecustomize.py``, which Python imports at start-up of every process of that server (the
  HTTP server, the scheduler and the detokenizer inherit ``PYTHONPATH``) and which makes memory
  pinning a no-op;
- ``sgl_kernel/``, a stand-in for SGLang's kernel extension whose functions raise
  ``NotImplementedError`` if SGLang ever calls one.

Both exist because SGLang's CPU engine imports names from ``sgl_kernel`` at module level and its
LoRA code asks for pinned host memory, while neither is needed on the path actually taken: see
the module docstrings for why neither changes what SGLang computes.
"""

import os

#: The directory to put first on the server process's ``PYTHONPATH``.
PATH = os.path.dirname(os.path.abspath(__file__))
