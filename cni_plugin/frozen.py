"""Entry of the frozen bundle (`make bundle`): one executable that is both pybridge and pyipam.

Installed as /opt/cni/bin/pybridge and, through a symlink to the same file, /opt/cni/bin/pyipam:
the name it was exec'd under picks the program. Then it does what the venv launchers do
(shim.py): forward the call to the resident agent, or serve it in-process when no agent
accepts. `pybridge agent` and `pybridge node` run the agents from the same bundle.
"""

import sys

from cni_plugin.shim import main as shim_main
from cnikit.programs import program_for


def main() -> None:
    shim_main(program_for(sys.argv[0] if sys.argv else ""))


if __name__ == "__main__":
    main()
