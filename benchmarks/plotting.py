"""Matplotlib for the benchmark scripts, when it is installed (`pip install "trl-kd[bench]"`)."""


def pyplot():
    """`matplotlib.pyplot` on the non-interactive Agg backend, or `None` (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    return plt
