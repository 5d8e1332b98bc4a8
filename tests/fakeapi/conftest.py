from ..netns.conftest import launchers

__all__ = ["launchers"]  # the installed pybridge/pyipam, as the netns tier uses them
