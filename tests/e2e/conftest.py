import pytest

from tests.e2e.harness import ServerProcess, free_port


@pytest.fixture
def server(tmp_path, store_url):
    """An all-in-one server on a fresh store of each kind; restartable on the same store."""
    port = free_port()
    proc = ServerProcess(
        ["up", "--data-dir", str(tmp_path / "data"), "--store", store_url,
         "--listen", f"127.0.0.1:{port}", "--default-lease-ms", "30000"],
        str(tmp_path / "server.log"),
    )
    proc.target = f"127.0.0.1:{port}"
    proc.start()
    yield proc
    proc.stop()
