"""`python -m scalellm.engine.layers.kernels`: build the serving kernels now (`make install` runs it).

A kernel that cannot be built is reported and left to the torch path, as at run time; the exit status
is 0 either way.
"""

import time

from scalellm.engine.layers.kernels import prebuild

start = time.monotonic()
for name, error in prebuild().items():
    print(f"kernel {name}: {'built' if error is None else 'unavailable, the torch path is used: ' + error}")
print(f"kernels ready in {time.monotonic() - start:.0f} s")
