"""Keep a lent Mac awake: while the node serves the pool, hold a PreventUserIdleSystemSleep power assertion, so
that macOS does not idle-sleep the machine under a request once its display has gone dark; release it the moment
lending stops, so the Mac sleeps as its owner set it to. Elsewhere this is a no-op.

    awake = SleepAssertion("duskpool node: serving the pool")
    awake.acquire()   # lending began (available, or draining the last requests)
    awake.release()   # lending stopped; macOS also drops it by itself if the process dies

The display still sleeps, and the assertion does not stop sleep for a closed lid, the Apple menu or a flat battery
(Apple's kIOPMAssertionTypePreventUserIdleSystemSleep documentation): the policy never lends a lid closed on
battery. `pmset -g assertions` lists it under the node's pid, named as given here.

IOKit is called through ctypes (IOPMAssertionCreateWithName, IOPMAssertionRelease, in IOKit/pwr_mgt/IOPMLib.h);
`load_frameworks()` is the one function that touches the system, so tests can stand in for it anywhere.
"""

import ctypes
import sys
import threading
from typing import Any

ASSERTION_TYPE = "PreventUserIdleSystemSleep"  # kIOPMAssertionTypePreventUserIdleSystemSleep
LEVEL_ON = 255  # kIOPMAssertionLevelOn
CF_STRING_ENCODING_UTF8 = 0x08000100  # kCFStringEncodingUTF8
IOKIT = "/System/Library/Frameworks/IOKit.framework/IOKit"
CORE_FOUNDATION = "/System/Library/Frameworks/CoreFoundation.framework/CoreFoundation"


def load_frameworks(platform: str = sys.platform, cdll=ctypes.CDLL) -> tuple[Any, Any] | None:
    """(IOKit, CoreFoundation) with the signatures we call declared, or None where they do not exist (not a Mac).
    The frameworks live in the dyld shared cache on macOS 11+, not on disk: dlopen finds them by these paths."""
    if platform != "darwin":
        return None
    iokit, cf = cdll(IOKIT), cdll(CORE_FOUNDATION)
    cf.CFStringCreateWithCString.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]
    cf.CFStringCreateWithCString.restype = ctypes.c_void_p
    cf.CFRelease.argtypes = [ctypes.c_void_p]
    cf.CFRelease.restype = None
    # IOReturn IOPMAssertionCreateWithName(CFStringRef type, IOPMAssertionLevel, CFStringRef name, IOPMAssertionID *)
    iokit.IOPMAssertionCreateWithName.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p,
                                                  ctypes.POINTER(ctypes.c_uint32)]
    iokit.IOPMAssertionCreateWithName.restype = ctypes.c_int32
    iokit.IOPMAssertionRelease.argtypes = [ctypes.c_uint32]
    iokit.IOPMAssertionRelease.restype = ctypes.c_int32
    return iokit, cf


class SleepAssertion:
    """One named PreventUserIdleSystemSleep assertion, held or not. acquire() and release() may be called from any
    thread and any number of times; neither raises (the node must keep serving): a failure is kept in `error`."""

    def __init__(self, name: str, frameworks=load_frameworks):
        self.name = name[:128]  # IOPMAssertionCreateWithName keeps at most 128 characters of a name
        self.error: str | None = None
        self._frameworks = frameworks
        self._loaded: tuple[Any, Any] | None | bool = False  # False: not loaded yet
        self._id: int | None = None
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        return self._id is not None

    def _libs(self) -> tuple[Any, Any] | None:
        if self._loaded is False:
            try:
                self._loaded = self._frameworks()
            except OSError as e:
                self._loaded, self.error = None, f"cannot load IOKit: {e}"
        return self._loaded  # type: ignore[return-value]

    def acquire(self) -> bool:
        """Hold the assertion (if not held yet). False where there is nothing to hold (not a Mac) or IOKit refused."""
        with self._lock:
            if self._id is not None:
                return True
            libs = self._libs()
            if libs is None:
                return False
            iokit, cf = libs
            strings = [cf.CFStringCreateWithCString(None, text.encode("utf-8", "replace"), CF_STRING_ENCODING_UTF8)
                       for text in (ASSERTION_TYPE, self.name)]
            try:
                if not all(strings):  # NULL: CoreFoundation could not make the string
                    self.error = f"CFStringCreateWithCString failed for {self.name!r}"
                    return False
                ident = ctypes.c_uint32(0)
                status = iokit.IOPMAssertionCreateWithName(strings[0], LEVEL_ON, strings[1], ctypes.pointer(ident))
            finally:
                for string in filter(None, strings):
                    cf.CFRelease(string)
            if status != 0:
                self.error = f"IOPMAssertionCreateWithName failed: IOReturn 0x{status & 0xFFFFFFFF:08x}"
                return False
            self._id, self.error = ident.value, None
            return True

    def release(self) -> None:
        """Let the Mac sleep again (if the assertion is held)."""
        with self._lock:
            if self._id is None:
                return
            iokit, _ = self._loaded  # type: ignore[misc]
            status = iokit.IOPMAssertionRelease(self._id)
            self._id = None
            if status != 0:
                self.error = f"IOPMAssertionRelease failed: IOReturn 0x{status & 0xFFFFFFFF:08x}"

    def __enter__(self) -> "SleepAssertion":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
