"""llama.cpp's RPC backend: the layers of a model on `rpc-server` processes, local or on other
machines, each of which exposes its CPU (or GPU) as a ggml device.

    FlowLlama(base, flow_path=flow, rpc_servers="10.0.0.2:50052,10.0.0.3:50052", tensor_split=[1, 1])
    loraflow generate -m base.gguf -f flow.gguf --rpc 10.0.0.2:50052,10.0.0.3:50052 --tensor-split 1,1

The model is placed on exactly the servers given, in their order (llama_model_params.devices),
every layer unless n_gpu_layers says fewer (those stay on the local CPU, from the first layer);
tensor_split gives each server's share, as llama.cpp's --tensor-split. The flow graph needs
nothing of its own: its tensors live with their layers, and the gate's record is read back from
wherever it was computed.

llama.cpp's RPC client aborts the process when a server it uses goes away (ggml-rpc has no error
path); loraflow turns that into one line `error: ...` naming the servers and exit code 1, so the
caller sees why instead of a C++ abort with a backtrace. A server that is not there at start is a
LoraFlowError naming its address.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import socket
import sys
import threading
from pathlib import Path

from loraflow.errors import LoraFlowError, NativeError

CONNECT_TIMEOUT = 5.0
_endpoints: list[str] = []          # every rpc-server this process has placed a model on
_lock = threading.Lock()


def parse_servers(servers) -> list[str]:
    """'HOST:PORT,HOST:PORT' (or a list of them) -> the list, each checked to be HOST:PORT."""
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    out = []
    for item in (str(s).strip() for s in items):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise LoraFlowError(f"rpc server '{item}' is not HOST:PORT")
        out.append(item)
    if not out:
        raise LoraFlowError("no rpc servers given")
    return out


def parse_split(split) -> list[float] | None:
    """'3,1' (or a list) -> [3.0, 1.0]: each device's share, as llama.cpp's --tensor-split."""
    if split is None or isinstance(split, (list, tuple)):
        return None if split is None else [float(x) for x in split]
    try:
        out = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        raise LoraFlowError(f"tensor split '{split}' is not a list of numbers like 3,1") from None
    if any(x < 0 for x in out) or not any(out):
        raise LoraFlowError(f"tensor split '{split}': shares must be >= 0 and not all 0")
    return out


def check_reachable(endpoint: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """A LoraFlowError naming `endpoint` unless something listens there (llama.cpp aborts the
    process when it cannot connect)."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise LoraFlowError(f"rpc-server {endpoint} is not there ({e.strerror or e}); start one there "
                            f"(loraflow-rpc-server -p {port}) or fix --rpc") from None


@functools.cache
def _libs():
    import llama_cpp

    if not llama_cpp.llama_supports_rpc():
        raise NativeError("this llama-cpp-python was built without llama.cpp's RPC backend: build one with "
                          "`make install-rpc` (CMAKE_ARGS=-DGGML_RPC=ON)")
    libdir = Path(llama_cpp.__file__).parent / "lib"
    try:   # the files libllama loaded: a wheel holds libX.so, libX.so.0, ... as copies, and opening
        # another name would load a second, separate ggml (its own devices, its own abort callback)
        loaded = [line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "/" in line]
    except OSError:
        loaded = []

    def load(stem):
        found = [p for p in loaded if Path(p).name.startswith(f"lib{stem}.so")]
        found = found or sorted(libdir.glob(f"lib{stem}.so.0")) or sorted(libdir.glob(f"lib{stem}.*"))
        if not found:
            raise NativeError(f"{libdir}: no lib{stem} (RPC support needs it)")
        return ctypes.CDLL(str(found[0]))

    rpc, base = load("ggml-rpc"), load("ggml-base")
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    base.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    base.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    base.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    base.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    base.ggml_set_abort_callback.argtypes = [_ABORT_CALLBACK]
    base.ggml_set_abort_callback.restype = ctypes.c_void_p
    return rpc, base


_ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)


@_ABORT_CALLBACK
def _on_abort(message: bytes) -> None:
    """ggml_abort's callback once a model is on rpc-servers: one line and exit 1 (abort() would
    follow it, after ggml's backtrace)."""
    text = message.decode(errors="replace").strip() if message else "ggml_abort"
    where, sep, what = text.partition(": ")    # ".../ggml-rpc.cpp:569: Remote RPC server crashed ..."
    text = os.path.basename(where) + sep + what
    sys.stderr.write(f"error: llama.cpp gave up (rpc-servers {', '.join(_endpoints)}): {text}; a server may have "
                     "stopped or the network failed, and llama.cpp's RPC client cannot go on, so this process exits\n")
    sys.stderr.flush()
    os._exit(1)


def devices(servers) -> ctypes.Array:
    """The ggml devices of the rpc-servers `servers` (each server's, in order), as the
    NULL-terminated array llama_model_params.devices takes. Checks the build and that every server
    is there first, and from now on ggml's aborts end the process with one line (see above)."""
    endpoints = parse_servers(servers)
    rpc, base = _libs()
    for endpoint in endpoints:
        check_reachable(endpoint)
    devs = []
    with _lock:
        for endpoint in endpoints:
            if endpoint not in _endpoints:
                _endpoints.append(endpoint)
        base.ggml_set_abort_callback(_on_abort)
        for endpoint in endpoints:
            reg = rpc.ggml_backend_rpc_add_server(endpoint.encode())
            n = base.ggml_backend_reg_dev_count(reg) if reg else 0
            if not n:
                raise LoraFlowError(f"rpc-server {endpoint} offers no devices")
            devs += [base.ggml_backend_reg_dev_get(reg, i) for i in range(n)]
    return (ctypes.c_void_p * (len(devs) + 1))(*devs, None)


@contextlib.contextmanager
def model_devices(array: ctypes.Array):
    """llama_cpp.Llama builds its llama_model_params inside __init__, without a devices argument:
    while this is open, the defaults it starts from carry `array`."""
    from llama_cpp import llama_cpp as C

    default = C.llama_model_default_params

    def params():
        p = default()
        p.devices = ctypes.cast(array, ctypes.c_void_p).value
        return p

    with _lock:
        C.llama_model_default_params = params
        try:
            yield
        finally:
            C.llama_model_default_params = default
