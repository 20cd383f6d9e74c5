"""xcr0run: run a program under a chosen subset of x86 XSAVE state components."""

__version__ = "0.1.0"
PROG = "xcr0run"  # the command's name, in messages and help
