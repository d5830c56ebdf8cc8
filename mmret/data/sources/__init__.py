"""Sources: how one kind of record renders into the source-neutral :mod:`mmret.data.example` (``mbeir``)."""
