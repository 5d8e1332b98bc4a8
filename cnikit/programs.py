"""The two programs and which one a call is for: the one place that knows "pybridge or pyipam?".

Stdlib-free (the exec'd shim imports it before anything else): one executable file serves both
names in the frozen bundle, where pyipam is a symlink to pybridge.
"""

PYBRIDGE = "pybridge"
PYIPAM = "pyipam"
PROGRAMS = (PYBRIDGE, PYIPAM)


def program_for(argv0: str) -> str:
    """The program an executable exec'd as `argv0` serves."""
    name = argv0.rsplit("/", 1)[-1]
    return PYIPAM if name.startswith(PYIPAM) else PYBRIDGE
