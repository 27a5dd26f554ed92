"""What pytest-benchmark records beside each result: how busy the machine was, and versions."""
import os
import platform


def pytest_benchmark_update_machine_info(config, machine_info):
    import Cython
    import numpy

    import taskwheel.core

    # Called as the results are written: the load of the shared machine over the last minutes.
    machine_info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["kernel"] = platform.release()
    machine_info["versions"] = {
        "cython": Cython.__version__,
        "numpy": numpy.__version__,
        "taskwheel_core_debug_build": taskwheel.core.DEBUG_BUILD,
    }
