"""`expertmesh serve` (filled in by the server issue)."""


def add_parser(sub) -> None:
    pass
