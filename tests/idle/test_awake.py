"""The sleep assertion: on any OS against stand-ins for IOKit and CoreFoundation that record every call (the ctypes
signatures included), and on a Mac against the real thing, as `pmset -g assertions` lists it."""

import ctypes
import os
import subprocess
import sys
import threading

import pytest

from duskpool.idle.awake import CF_STRING_ENCODING_UTF8, LEVEL_ON, SleepAssertion, load_frameworks
from duskpool.idle.probes import parse_pmset_assertions


class Function:
    """A C function of a CDLL: takes argtypes/restype like ctypes' own, records each call, answers with `answer`."""

    def __init__(self, log: list, name: str, answer):
        self.log, self.name, self.answer = log, name, answer
        self.argtypes = self.restype = None

    def __call__(self, *args):
        self.log.append((self.name, args))
        return self.answer(*args)


class Frameworks:
    """IOKit and CoreFoundation as load_frameworks returns them; CFStrings are handles 100, 101... into `strings`."""

    def __init__(self, create_status: int = 0, release_status: int = 0, assertion_id: int = 7301):
        self.calls: list[tuple[str, tuple]] = []
        self.strings: dict[int, bytes] = {}
        self.loads = 0

        def create_string(allocator, text, encoding):
            assert allocator is None and encoding == CF_STRING_ENCODING_UTF8
            handle = 100 + len(self.strings)
            self.strings[handle] = text
            return handle

        def create_assertion(kind, level, name, out):
            out.contents.value = assertion_id  # IOKit writes the id through the pointer
            return create_status

        log = self.calls
        self.iokit = type("IOKit", (), {})()
        self.iokit.IOPMAssertionCreateWithName = Function(log, "IOPMAssertionCreateWithName", create_assertion)
        self.iokit.IOPMAssertionRelease = Function(log, "IOPMAssertionRelease", lambda ident: release_status)
        self.cf = type("CoreFoundation", (), {})()
        self.cf.CFStringCreateWithCString = Function(log, "CFStringCreateWithCString", create_string)
        self.cf.CFRelease = Function(log, "CFRelease", lambda ref: None)

    def __call__(self):
        self.loads += 1
        return self.iokit, self.cf

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def test_acquire_makes_the_assertion_and_frees_its_strings():
    fw = Frameworks()
    awake = SleepAssertion("duskpool node: serving the pool", frameworks=fw)
    assert awake.acquire() is True and awake.held and awake.error is None
    assert fw.names() == ["CFStringCreateWithCString", "CFStringCreateWithCString", "IOPMAssertionCreateWithName",
                          "CFRelease", "CFRelease"]
    assert fw.strings == {100: b"PreventUserIdleSystemSleep", 101: b"duskpool node: serving the pool"}
    kind, level, name, out = fw.calls[2][1]
    assert (kind, level, name) == (100, LEVEL_ON, 101) and LEVEL_ON == 255
    assert isinstance(out, ctypes.POINTER(ctypes.c_uint32))
    assert [args for name, args in fw.calls[3:]] == [(100,), (101,)]


def test_release_gives_back_the_id_iokit_returned():
    fw = Frameworks(assertion_id=7301)
    awake = SleepAssertion("n", frameworks=fw)
    awake.acquire()
    awake.release()
    assert fw.calls[-1] == ("IOPMAssertionRelease", (7301,)) and not awake.held


def test_acquire_and_release_are_idempotent():
    """The node calls acquire on every step it lends and release on every step it does not: one assertion."""
    fw = Frameworks()
    awake = SleepAssertion("n", frameworks=fw)
    for _ in range(3):
        awake.acquire()
    for _ in range(3):
        awake.release()
    assert fw.names().count("IOPMAssertionCreateWithName") == 1
    assert fw.names().count("IOPMAssertionRelease") == 1
    assert fw.loads == 1


def test_again_after_release():
    fw = Frameworks()
    awake = SleepAssertion("n", frameworks=fw)
    with awake:
        assert awake.held
    assert not awake.held
    awake.acquire()
    assert fw.names().count("IOPMAssertionCreateWithName") == 2


def test_iokit_refusing_is_an_error_not_an_exception():
    fw = Frameworks(create_status=-536870212)  # kIOReturnError, 0xe00002bc
    awake = SleepAssertion("n", frameworks=fw)
    assert awake.acquire() is False and not awake.held
    assert awake.error == "IOPMAssertionCreateWithName failed: IOReturn 0xe00002bc"
    assert fw.names().count("CFRelease") == 2  # the strings are freed on failure too
    awake.release()
    assert "IOPMAssertionRelease" not in fw.names()


def test_a_long_name_is_cut_to_what_iokit_keeps():
    fw = Frameworks()
    SleepAssertion("x" * 300, frameworks=fw).acquire()
    assert fw.strings[101] == b"x" * 128


def test_concurrent_acquires_make_one_assertion():
    fw = Frameworks()
    awake = SleepAssertion("n", frameworks=fw)
    threads = [threading.Thread(target=awake.acquire) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fw.names().count("IOPMAssertionCreateWithName") == 1


def test_missing_frameworks_are_a_no_op():
    def absent():
        raise OSError("dlopen(IOKit): image not found")
    awake = SleepAssertion("n", frameworks=absent)
    assert awake.acquire() is False and awake.error == "cannot load IOKit: dlopen(IOKit): image not found"
    awake.release()


def test_load_frameworks_declares_the_c_signatures():
    """Without restype c_void_p a CFStringRef would be cut to a 32-bit int: the declarations are the contract."""
    opened = {}

    class Library:
        def __init__(self, path):
            opened[path] = self

        def __getattr__(self, name):
            function = Function([], name, None)
            setattr(self, name, function)
            return function

    iokit, cf = load_frameworks("darwin", cdll=Library)
    assert list(opened) == ["/System/Library/Frameworks/IOKit.framework/IOKit",
                            "/System/Library/Frameworks/CoreFoundation.framework/CoreFoundation"]
    create = iokit.IOPMAssertionCreateWithName
    assert create.argtypes == [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    assert create.restype is ctypes.c_int32
    assert (iokit.IOPMAssertionRelease.argtypes, iokit.IOPMAssertionRelease.restype) == ([ctypes.c_uint32],
                                                                                           ctypes.c_int32)
    string = cf.CFStringCreateWithCString
    assert (string.argtypes, string.restype) == ([ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32], ctypes.c_void_p)
    assert cf.CFRelease.argtypes == [ctypes.c_void_p]
    assert load_frameworks("linux", cdll=Library) is None


@pytest.mark.skipif(sys.platform == "darwin", reason="off macOS only")
def test_a_no_op_off_macos():
    assert load_frameworks() is None
    awake = SleepAssertion("n")
    assert awake.acquire() is False and not awake.held and awake.error is None
    awake.release()


def ours(name: str) -> list:
    text = subprocess.run(["pmset", "-g", "assertions"], capture_output=True, text=True, check=True).stdout
    return [a for a in parse_pmset_assertions(text) if a.pid == os.getpid() and a.name == name]


@pytest.mark.skipif(sys.platform != "darwin", reason="IOKit power assertions exist on macOS only")
def test_pmset_lists_the_assertion_while_it_is_held():
    name = f"duskpool test {os.getpid()}"
    awake = SleepAssertion(name)
    assert awake.acquire(), awake.error
    try:
        assert [a.kind for a in ours(name)] == ["PreventUserIdleSystemSleep"]
    finally:
        awake.release()
    assert ours(name) == []
