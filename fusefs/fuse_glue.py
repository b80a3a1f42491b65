"""fusepy's FUSE loop, with a lasting Python thread state for each libfuse thread and lean
glue for the two calls that come with nearly every other.

Thread states: libfuse calls back on threads it started itself, and for a thread Python
does not know, ctypes makes a new thread state for every callback and deletes it on the
way out (PyGILState_Ensure and Release with nothing else holding it). That cost about
24 µs of every request here, a fifth of a whole GETATTR round trip, and left every
threading.local empty at each call. `ThreadStates` takes one more hold on a thread's first
callback, so its state lasts as long as the thread, and a thread-specific key's destructor
deletes the state when libfuse ends the thread (it stops idle workers beyond ten), so that
no state outlives its thread (docs/filesystem.md, "The FUSE loop").

GETATTR: the kernel asks for a directory's attributes before most changes in it (the
previous change invalidated them, and `default_permissions` checks against them), and
libfuse answers every LOOKUP and CREATE with a getattr. fusepy's glue for it zeroes the
stat buffer with a foreign call (which releases the GIL and must win it back from the
daemon's other threads), asks for a dict, copies it in field by field, and turns a
missing name into two more exceptions on the way out: about 7 µs of Python per call in a
tight loop, more than the core's own answer. Here one `struct.pack_into` writes the whole
buffer from a tuple, its padding as zeros (0.6 µs), and an error is returned, not raised.

GETXATTR: the kernel asks for `security.capability` before every write, and almost every
file has none; the answer is returned directly instead of raised through three layers.

READ: fusepy's glue joins the answer into one bytes and copies it into the kernel's buffer
with `ctypes.memmove`, a foreign call, which releases the GIL and must win it back from the
daemon's other threads: in a cold sequential read they are many (read-ahead, the disk
cache writer, the other FUSE threads), so every 128 KiB paid a hand-over. Here the pieces
of the answer are copied straight into the buffer through a memoryview: one copy, and the
GIL is kept.

FALLOCATE: fusepy's table of operations stops at `ioctl`; libfuse 2.9's goes on with
poll, write_buf, read_buf, flock and fallocate. `_Operations` is fusepy's table with those
five appended (the first four left empty), so that `Mount.fallocate` is called.

Everything else is fusepy's. Errors follow the adapter's one policy (`errno_of`): nothing
escapes, the unexpected is logged and answered EIO.
"""

from __future__ import annotations

import ctypes
import errno
import operator
import signal
import struct
import threading

import fuse
from fuse import FUSE, c_off_t, c_stat, c_timespec, fuse_file_info

from .fuse_ops import STAT_KEYS, errno_of

NS = 1_000_000_000
_INTEGER_CODES = {4: "i", 8: "q"}


def stat_layout() -> tuple[struct.Struct, operator.itemgetter]:
    """A Struct that writes a whole `c_stat` (as fusepy declares it for this machine), and
    the getter that puts the glue's flat values (`_flat`) into its order."""
    flat = [k for k in STAT_KEYS if not k.endswith("time")]
    flat += [f"{k}.{part}" for k in STAT_KEYS if k.endswith("time") for part in ("sec", "nsec")]
    fields = []  # (offset, size, signed, index in flat)
    for index, key in enumerate(flat):
        name, _, part = key.partition(".")
        if part:
            spec, sub = getattr(c_stat, name + "spec"), getattr(c_timespec, "tv_" + part)
            fields.append((spec.offset + sub.offset, sub.size, True, index))
        else:
            field = getattr(c_stat, name)
            fields.append((field.offset, field.size, name in ("st_size", "st_blocks"), index))
    fields.sort()
    fmt, end = "=", 0
    for offset, size, signed, _ in fields:
        if offset < end or size not in _INTEGER_CODES:
            raise ValueError(f"unexpected struct stat layout at offset {offset}")
        code = _INTEGER_CODES[size]
        fmt += (f"{offset - end}x" if offset > end else "") + (code if signed else code.upper())
        end = offset + size
    fmt += f"{ctypes.sizeof(c_stat) - end}x" if ctypes.sizeof(c_stat) > end else ""
    return struct.Struct(fmt), operator.itemgetter(*(f[3] for f in fields))


STAT, STAT_ORDER = stat_layout()


class _Operations(ctypes.Structure):
    """libfuse 2.9's `struct fuse_operations`: fusepy's fields, then the five it lacks."""
    _fields_ = fuse.fuse_operations._fields_ + [
        ("poll", ctypes.c_voidp), ("write_buf", ctypes.c_voidp),
        ("read_buf", ctypes.c_voidp), ("flock", ctypes.c_voidp),
        ("fallocate", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_int, c_off_t,
                                       c_off_t, ctypes.POINTER(fuse_file_info))),
    ]


# fusepy's FUSE() builds the table it hands libfuse from this module-level name; only
# operations objects that have a `fallocate` (and none has poll/flock...) fill the rest.
fuse.fuse_operations = _Operations


def _flat(values: tuple) -> tuple:
    """`FuseOps.attributes` values with each time split into seconds and nanoseconds."""
    (ino, mode, nlink, uid, gid, rdev, size, blksize, blocks, atime, mtime, ctime) = values
    return (ino, mode, nlink, uid, gid, rdev, size, blksize, blocks,
            *divmod(atime, NS), *divmod(mtime, NS), *divmod(ctime, NS))


_pythonapi = ctypes.pythonapi
_pythonapi.PyGILState_Ensure.restype = ctypes.c_int
_pythonapi.PyGILState_Release.argtypes = [ctypes.c_int]
_pythonapi.PyThreadState_Get.restype = ctypes.c_void_p
_pythonapi.PyThreadState_Clear.argtypes = [ctypes.c_void_p]
_pythonapi.PyThreadState_Delete.argtypes = [ctypes.c_void_p]
_pythonapi.PyInterpreterState_Get.restype = ctypes.c_void_p
_pythonapi.PyInterpreterState_ThreadHead.restype = ctypes.c_void_p
_pythonapi.PyInterpreterState_ThreadHead.argtypes = [ctypes.c_void_p]
_pythonapi.PyThreadState_Next.restype = ctypes.c_void_p
_pythonapi.PyThreadState_Next.argtypes = [ctypes.c_void_p]
_libc = ctypes.CDLL(None)  # pthread_key_create, pthread_setspecific
_libc.pthread_setspecific.argtypes = [ctypes.c_uint, ctypes.c_void_p]
_KEY_DESTRUCTOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_libc.signal.restype = ctypes.c_void_p
_libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
_SIG_IGN = 1  # the C handler value that means "ignore"


def _ignore_sigpipe() -> None:
    """Ignore SIGPIPE again, as Python does from its start. libfuse 2 ignores it while it
    serves and sets it back to "terminate" when it stops: a write to a closed connection
    afterwards (the daemon closing its stores, or any later work in the process) would kill
    the process without a word instead of raising EPIPE. Through libc, because Python's
    `signal` module works only in the main thread and only knows what Python set."""
    _libc.signal(int(signal.SIGPIPE), _SIG_IGN)


class ThreadStates:
    """One lasting Python thread state per foreign thread that calls `keep()`.

    The process has one (`THREAD_STATES`): its key and destructor must outlive every thread
    that used it. `kept` counts the states kept and not yet deleted (the GIL guards it).
    """

    def __init__(self):
        self._local = threading.local()  # `held`: set once this thread's state is kept
        self._delete_at_exit = _KEY_DESTRUCTOR(self._delete)
        self._key = ctypes.c_uint()
        if _libc.pthread_key_create(ctypes.byref(self._key), self._delete_at_exit) != 0:
            raise OSError("pthread_key_create failed")
        self.kept = 0

    def keep(self) -> None:
        """Called with the GIL held, at each callback: from the first one on, the state of
        this (foreign) thread lasts until the thread ends."""
        if hasattr(self._local, "held"):
            return
        if threading.get_ident() in {t.ident for t in threading.enumerate()}:
            # A thread Python started (init and destroy run on the one that mounted): its
            # state lasts anyway, and Python deletes it at the thread's end, not us.
            self._local.held = None
            return
        self._local.held = _pythonapi.PyGILState_Ensure()  # a second hold: never released
        self.kept += 1
        # The key's value is the state itself: the destructor gets it even though Python's
        # own key for the thread's state may be cleared first (glibc clears them in order).
        _libc.pthread_setspecific(self._key.value, _pythonapi.PyThreadState_Get())

    def _delete(self, state) -> None:
        """The thread ends, and ctypes took the GIL to run this. If it found the kept state,
        giving our hold back lets ctypes delete it on return; if it made a new one (Python's
        key was cleared already), the kept one is deleted here."""
        if state == _pythonapi.PyThreadState_Get():
            self.kept -= 1
            _pythonapi.PyGILState_Release(self._local.held)
        elif state in _thread_states():  # never a state someone else deleted already
            self.kept -= 1
            _pythonapi.PyThreadState_Clear(state)
            _pythonapi.PyThreadState_Delete(state)


def _thread_states() -> set[int]:
    """The addresses of this interpreter's thread states (the GIL held)."""
    found, state = set(), _pythonapi.PyInterpreterState_ThreadHead(
        _pythonapi.PyInterpreterState_Get())
    while state:
        found.add(state)
        state = _pythonapi.PyThreadState_Next(state)
    return found


THREAD_STATES = ThreadStates()


class Mount(FUSE):
    """Mounts `operations` (a FuseOps) and serves it until unmounted, like fusepy's FUSE."""

    def __init__(self, *args, **kwargs):
        try:
            super().__init__(*args, **kwargs)
        finally:
            _ignore_sigpipe()

    @staticmethod
    def _wrapper(func, *args, **kwargs):
        THREAD_STATES.keep()
        return FUSE._wrapper(func, *args, **kwargs)

    def getattr(self, path, buf):
        return self.fgetattr(path, buf, None)

    def fgetattr(self, path, buf, fip):
        name = None if path is None else path.decode(self.encoding)
        try:
            values = self.operations.attributes(name, fip.contents if fip else None)
            STAT.pack_into(buf.contents, 0, *STAT_ORDER(_flat(values)))
        except Exception as e:  # noqa: BLE001 - the adapter's policy: an errno, never an escape
            return -errno_of(e, "getattr", (name,))
        return 0

    def read(self, path, buf, size, offset, fip):
        name = None if path is None else path.decode(self.encoding)
        try:
            pieces = self.operations.read_pieces(name, size, offset, fip.contents)
            out = memoryview((ctypes.c_ubyte * size).from_address(
                ctypes.addressof(buf.contents))).cast("B")
            at = 0
            for piece in pieces:
                n = min(len(piece), size - at)
                out[at:at + n] = piece if n == len(piece) else memoryview(piece)[:n]
                at += n
        except Exception as e:  # noqa: BLE001 - as above
            return -errno_of(e, "read", (name,))
        return at

    def write(self, path, buf, size, offset, fip):
        """The kernel's bytes as a view of libfuse's buffer, not fusepy's copy of them: the
        core copies them into the file's block and keeps no reference past the call."""
        data = memoryview((ctypes.c_ubyte * size).from_address(
            ctypes.addressof(buf.contents))).cast("B")
        return self.operations("write", self._decode_optional_path(path), data, offset,
                               fip.contents if self.raw_fi else fip.contents.fh)

    def fallocate(self, path, mode, offset, length, fip):
        name = None if path is None else path.decode(self.encoding)
        try:
            self.operations.allocate(name, mode, offset, length, fip.contents.fh)
        except Exception as e:  # noqa: BLE001 - as above
            return -errno_of(e, "fallocate", (name,))
        return 0

    def readdir(self, path, buf, filler, offset, fip):
        """Each entry with its inode number (d_ino equals st_ino under `use_ino`) and file
        type (d_type, from st_mode: `find` looks up only the directories): one reused
        stat buffer, of which libfuse reads only st_ino and st_mode."""
        name = None if path is None else path.decode(self.encoding)
        try:
            entries = self.operations.listing(name, fip.contents.fh, offset)
        except Exception as e:  # noqa: BLE001 - as above
            return -errno_of(e, "readdir", (name,))
        st = c_stat()
        for place in range(offset, len(entries)):  # (a slice would copy the rest each time)
            entry, st.st_ino, st.st_mode = entries[place]
            if filler(buf, entry, st if st.st_ino else None, place + 1) != 0:
                break  # the kernel's buffer is full: it asks again from `place`
        return 0

    def getxattr(self, path, name, value, size, *args):
        path, name = path.decode(self.encoding), name.decode(self.encoding)
        try:
            data = self.operations.xattr_value(path, name)
        except Exception as e:  # noqa: BLE001 - as above
            return -errno_of(e, "getxattr", (path, name))
        if not value:  # the caller asks how large it is
            return len(data)
        if len(data) > size:
            return -errno.ERANGE
        ctypes.memmove(value, data, len(data))
        return len(data)
