"""Writing files whole or not at all: every file the package writes goes through atomic_write, so a crash, a full
disk or a kill leaves the previous file (or none), never half of one."""
import errno
import hashlib
import os
import re
import secrets
import socket
import stat

from ..errors import WriteError


def atomic_write(path, write):
    """Call write(tmp_path) on a temporary file beside `path`, then rename it over `path`.

    The temporary file, .tmp-<name>.<host>-<pid>-<random>, gets the mode a plain open() would give `path`: the
    existing file's, else 0666 & ~umask. The temporary files of `path` that a killed writer left (this host, a pid
    that is gone) are removed first. A write that fails on an OS error (a full disk, a missing folder, a folder named
    `path`) raises WriteError naming `path`; the previous file stays as it was and no temporary file is left."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    check_output_file(path)
    name = os.path.basename(path)
    _remove_stale_temporaries(folder, name)
    tmp = os.path.join(folder, f"{_TMP}{name}.{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))   # the umask applies, as for open()
        if os.path.isfile(path):
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        _discard(tmp)
        code = _os_errno(e) if isinstance(e, Exception) and not isinstance(e, WriteError) else None
        if code is not None:
            raise WriteError(code, os.strerror(code), path) from e
        raise


_TMP = ".tmp-"


def _host_tag():
    """8 hex digits naming this host in temporary-file names: a pid means something on its own host only."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def check_output_file(path, missing_folders=False):
    """Raise WriteError naming `path` if no file can be written there: it is a folder, a file stands where a folder
    should be, or its folder does not exist (unless missing_folders=True: the caller makes them)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise WriteError(errno.EISDIR, "it is a folder; name a file", path)
    parent = folder
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise WriteError(errno.ENOTDIR, f"{parent} is a file, not a folder", path)
    if parent != folder and not missing_folders:
        raise WriteError(errno.ENOENT, f"the folder {folder} does not exist", path)


def _remove_stale_temporaries(folder, name):
    """Remove the temporary files of `name` in `folder` whose writer, a process of this host, is gone."""
    pattern = re.compile(re.escape(_TMP + name) + r"\.([0-9a-f]{8})-(\d+)-[0-9a-f]{8}")
    host = _host_tag()
    try:
        entries = [e.name for e in os.scandir(folder) if e.name.startswith(_TMP + name + ".")]
    except OSError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry)
        if m and m.group(1) == host and not _alive(int(m.group(2))):
            _discard(os.path.join(folder, entry))


def _alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True   # it exists, owned by another user
    return True


def _os_errno(error):
    """The errno behind a failed write: of an OSError in the exception's chain (torch.save reports a full disk as
    "unexpected pos", raised while handling the OSError), or in the text of a Rust I/O error (safetensors:
    "... (os error 28)"); None when there is none."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    m = re.search(r"\(os error (\d+)\)", str(error))
    return int(m.group(1)) if m else None


def _discard(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)
