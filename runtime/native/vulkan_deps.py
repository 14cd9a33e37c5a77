"""System packages and headers for llama.cpp's Vulkan backend (`make install-vulkan`).

    python3 runtime/native/vulkan_deps.py      # installs what is missing, prints the CMake arguments

Installs Debian's mesa-vulkan-drivers (real GPU drivers, and lavapipe, Mesa's software Vulkan
device that `make test-vulkan` runs on), libvulkan-dev, glslc, spirv-headers and vulkan-tools
where they are missing (apt-get, as root or through sudo). This llama.cpp's ggml-vulkan needs Vulkan headers
of version 1.3.261 or newer (VK_EXT_layer_settings); Debian 12 ships 1.3.239, so there the
header files of Debian 13's libvulkan-dev are fetched from the Debian package index
(`apt-get download` with a sources list of its own; nothing is installed) and unpacked into
$LORAFLOW_CACHE/vulkan-headers, once. Where the system's headers are new enough (Debian 13)
they are used. Progress goes to stderr; stdout gets only the CMake arguments.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = ("mesa-vulkan-drivers", "libvulkan-dev", "glslc", "spirv-headers", "vulkan-tools")
MIN_HEADERS = (1, 3, 261)
SYSTEM_HEADER = Path("/usr/include/vulkan/vulkan_core.h")
NEWER_RELEASE = "trixie"  # the Debian release whose libvulkan-dev headers are new enough


def log(msg: str) -> None:
    print(f"vulkan_deps: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> None:
    if os.geteuid() != 0 and cmd[0] in ("apt-get",):
        cmd = ["sudo", *cmd]
    log("+ " + " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=sys.stderr, **kw)


def missing_packages() -> list[str]:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n", *PACKAGES],
                         capture_output=True, text=True).stdout
    installed = {line.split()[0] for line in out.splitlines() if line.endswith(" installed")}
    return [p for p in PACKAGES if p not in installed]


def header_version(header: Path) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a vulkan_core.h."""
    if not header.is_file():
        return None
    text = header.read_text(errors="replace")
    patch = re.search(r"^#define VK_HEADER_VERSION (\d+)", text, re.M)
    complete = re.search(r"^#define VK_HEADER_VERSION_COMPLETE VK_MAKE_API_VERSION\(\d+, (\d+), (\d+),", text, re.M)
    if not patch or not complete:
        return None
    return int(complete[1]), int(complete[2]), int(patch[1])


def newer_headers(cache: Path) -> Path:
    """The include folder of the newer release's libvulkan-dev, fetched and unpacked once."""
    for include in sorted(cache.glob("*/usr/include")):
        if (version := header_version(include / "vulkan" / "vulkan_core.h")) and version >= MIN_HEADERS:
            return include
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        tmp = Path(tmp)
        (tmp / "sources").mkdir()
        (tmp / "sources" / f"{NEWER_RELEASE}.sources").write_text(
            f"Types: deb\nURIs: http://deb.debian.org/debian\nSuites: {NEWER_RELEASE}\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
        apt = ["apt-get", "-q", "-o", "Dir::Etc::sourcelist=/dev/null", "-o", f"Dir::Etc::sourceparts={tmp}/sources",
               "-o", f"Dir::State::Lists={tmp}/lists", "-o", f"Dir::Cache={tmp}/cache",
               "-o", "APT::Sandbox::User=root"]
        for d in ("lists/partial", "cache/archives/partial"):
            (tmp / d).mkdir(parents=True)
        run([*apt, "update"])
        run([*apt, "download", f"libvulkan-dev/{NEWER_RELEASE}"], cwd=tmp)
        (deb,) = tmp.glob("libvulkan-dev_*.deb")
        version = deb.name.split("_")[1]
        unpacked = tmp / "unpacked"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        dest = cache / version
        shutil.rmtree(dest, ignore_errors=True)
        # the header files only: the library itself stays the system's
        (dest / "usr").mkdir(parents=True)
        shutil.move(str(unpacked / "usr" / "include"), str(dest / "usr" / "include"))
    log(f"Vulkan headers {version} in {dest}")
    return dest / "usr" / "include"


def main() -> int:
    missing = missing_packages()
    if missing:
        log("installing " + " ".join(missing))
        run(["apt-get", "update", "-q"])
        run(["apt-get", "install", "-y", "-q", *missing], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    args = ["-DGGML_VULKAN=on"]
    system = header_version(SYSTEM_HEADER)
    if system is None or system < MIN_HEADERS:
        log(f"system Vulkan headers {'.'.join(map(str, system)) if system else 'missing'} < "
            f"{'.'.join(map(str, MIN_HEADERS))}: using {NEWER_RELEASE}'s")
        cache = Path(os.environ.get("LORAFLOW_CACHE", Path.home() / ".cache" / "loraflow")) / "vulkan-headers"
        args.append(f"-DVulkan_INCLUDE_DIR={newer_headers(cache)}")
    print(" ".join(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
