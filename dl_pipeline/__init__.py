"""dl_pipeline: Spark prepare -> Horovod/PyTorch train -> Spark batch score."""

__version__ = "0.1.0"

import warnings as _warnings

# petastorm 0.12 uses pyarrow's legacy dataset API (the reason pyarrow is pinned to 14); its
# deprecation warnings say nothing actionable to a user of this package.
for _mod in ("petastorm", "pyarrow"):
    _warnings.filterwarnings("ignore", category=FutureWarning, module=_mod)
    _warnings.filterwarnings("ignore", category=DeprecationWarning, module=_mod)
