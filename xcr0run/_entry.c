/* The `xcr0run` command: the first program image, before any Python.
 *
 * CPython sets SIGPIPE and SIGXFSZ to SIG_IGN while it starts, whatever they were
 * (and PYTHONFAULTHANDLER puts handlers over SIGSEGV, SIGFPE, SIGABRT, SIGBUS and
 * SIGILL), so once the interpreter runs, what the parent passed on is lost. This
 * program records it first and then becomes the interpreter that runs xcr0run:
 *
 *   XCR0RUN_ENTRY=<pid>:<ignored>   appended to the environment; <ignored> is the set of
 *                                   signals whose disposition was SIG_IGN, in hex, bit
 *                                   (signal - 1), as SigIgn in /proc/PID/status shows it
 *
 * xcr0run/launcher.py trusts the record only in the process it was made for (the pid:
 * exec keeps it), gives the program exactly those dispositions, and leaves the record
 * out of the program's environment. Nothing else is changed here but SIGINT's place in
 * the blocked mask, for the interpreter's start only: no disposition, no descriptor, no
 * other variable. A variable of that name that was already there is replaced.
 *
 * SIGINT is blocked across the exec (if it was neither blocked nor ignored) and the
 * code below unblocks it first thing, once it has put SIG_DFL in place of Python's
 * handler: Ctrl-C during the interpreter's start (site and the .pth files' imports,
 * tens of milliseconds) then kills xcr0run with SIGINT, as it would kill the program,
 * instead of a KeyboardInterrupt traceback and exit 1 from inside Python's start.
 *
 * The interpreter: XCR0RUN_PYTHON (python3.X, the version the package was built for,
 * which its wheel's tag guarantees) or python3, first beside this program's own file
 * (/proc/self/exe, symlinks resolved: a virtual environment's, a prefix's, pipx's bin
 * directory), else the first of them in an absolute PATH directory (where pip puts
 * scripts apart from the interpreter: ~/.local/bin for --user, /usr/local/bin on
 * Debian). The interpreter's path at build time is no guide: pip builds in an isolated
 * environment and may reuse a wheel for another environment.
 *
 * It runs the code below with -c, not -m: -m would put the current directory first on
 * sys.path (so ./click or ./xcr0run would be imported), and before Python 3.11 nothing
 * turns that off; -c puts "" there, which the code removes before importing anything.
 * sys.argv then reads as under a console script: this file's path, then the arguments.
 *
 * Our own failures exit with 125, as coreutils launchers do, in one line on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef XCR0RUN_PYTHON
#define XCR0RUN_PYTHON "python3" /* setup.py passes "python3.X" */
#endif

#define RECORD "XCR0RUN_ENTRY"
#define FAILURE 125
#define DEFAULT_PATH "/bin:/usr/bin" /* Python's os.defpath, as launcher.find_command */

extern char **environ;

/* The first lines: Ctrl-C while Python starts kills xcr0run with SIGINT, as it would
 * the program, rather than raising KeyboardInterrupt inside an import (__main__.py);
 * BOOT_UNBLOCK then lets in a SIGINT that the interpreter's start held back (above). */
#define BOOT_SIGINT                                                                        \
    "import _signal\n"                                                                     \
    "if _signal.getsignal(2) is _signal.default_int_handler:\n"                            \
    "    _signal.signal(2, _signal.SIG_DFL)\n"
#define BOOT_REST                                                                          \
    "import sys\n"                                                                         \
    "if not getattr(sys.flags, 'safe_path', False):\n"                                     \
    "    del sys.path[0]\n"                                                                \
    "del sys.argv[0]\n"                                                                    \
    "try:\n"                                                                               \
    "    from xcr0run.__main__ import main\n"                                              \
    "except ImportError as err:\n"                                                         \
    "    if sys.stderr:\n"                                                                 \
    "        sys.stderr.write(f'xcr0run: {sys.executable} cannot import xcr0run: {err}\\n')\n"\
    "    raise SystemExit(125)\n"                                                          \
    "main()\n"

static const char BOOT[] = BOOT_SIGINT BOOT_REST;
static const char BOOT_UNBLOCK[] =
    BOOT_SIGINT "_signal.pthread_sigmask(_signal.SIG_UNBLOCK, [2])\n" BOOT_REST;

static sigset_t caller_mask; /* restored where no interpreter runs after all */

static int give_up(int status)
{
    sigprocmask(SIG_SETMASK, &caller_mask, NULL); /* a held-back Ctrl-C ends us here */
    return status;
}

static uint64_t ignored_signals(void)
{
    uint64_t set = 0;
    struct sigaction old;
    for (int sig = 1; sig < NSIG && sig <= 64; sig++) {
        /* glibc refuses its own two (32, 33), for us and for the program alike */
        if (sigaction(sig, NULL, &old) == 0 && old.sa_handler == SIG_IGN)
            set |= UINT64_C(1) << (sig - 1);
    }
    return set;
}

/* The environment with the record in place of any variable of that name. */
static char **with_record(char *record)
{
    size_t n = 0;
    for (char **e = environ; e && *e; e++)
        n++;
    char **env = calloc(n + 2, sizeof *env);
    if (!env)
        return NULL;
    size_t k = 0;
    for (char **e = environ; e && *e; e++)
        if (strncmp(*e, RECORD "=", sizeof RECORD) != 0)
            env[k++] = *e;
    env[k++] = record;
    env[k] = NULL;
    return env;
}

struct candidates {
    char **argv, **env;
};

/* execve DIR/NAME. Returns 0 to go on to the next candidate (not there, or not
 * executable, as execvp goes on), else our exit status after saying why. */
static int try_exec(const struct candidates *c, const char *dir, size_t dir_len,
                    const char *name)
{
    char path[PATH_MAX];
    int len = snprintf(path, sizeof path, "%.*s/%s", (int)dir_len, dir, name);
    if (len < 0 || (size_t)len >= sizeof path)
        return 0;
    c->argv[0] = path;
    execve(path, c->argv, c->env);
    int err = errno;
    if (err == ENOENT || err == ENOTDIR || err == EACCES || err == ELOOP ||
        err == ENAMETOOLONG)
        return 0;
    fprintf(stderr, "xcr0run: cannot run %s: %s\n", path, strerror(err));
    return FAILURE;
}

int main(int argc, char **argv)
{
    static const char *const names[] = {XCR0RUN_PYTHON, "python3"};
    size_t n_names = strcmp(names[0], names[1]) == 0 ? 1 : 2;

    char self[PATH_MAX];
    ssize_t self_len = readlink("/proc/self/exe", self, sizeof self);
    if (self_len < 0 || (size_t)self_len >= sizeof self)
        self_len = 0; /* no /proc, or too long to tell */
    self[self_len] = '\0';
    const char *slash = strrchr(self, '/');

    char record[sizeof RECORD + 48];
    snprintf(record, sizeof record, RECORD "=%ld:%llx", (long)getpid(),
             (unsigned long long)ignored_signals());
    struct candidates c = {
        .argv = calloc((size_t)(argc > 0 ? argc : 1) + 4, sizeof(char *)),
        .env = with_record(record),
    };
    if (!c.argv || !c.env) {
        fprintf(stderr, "xcr0run: %s\n", strerror(ENOMEM));
        return FAILURE;
    }
    c.argv[1] = "-c";
    c.argv[2] = (char *)BOOT;
    sigprocmask(SIG_BLOCK, NULL, &caller_mask);
    if (!sigismember(&caller_mask, SIGINT) && !(ignored_signals() & (UINT64_C(1) << (SIGINT - 1)))) {
        sigset_t sigint;
        sigemptyset(&sigint);
        sigaddset(&sigint, SIGINT);
        sigprocmask(SIG_BLOCK, &sigint, NULL);
        c.argv[2] = (char *)BOOT_UNBLOCK;
    }
    c.argv[3] = slash ? self : (argc > 0 && argv[0] ? argv[0] : "xcr0run");
    for (int i = 1; i < argc; i++)
        c.argv[3 + i] = argv[i];

    int status;
    for (size_t i = 0; slash && i < n_names; i++)
        if ((status = try_exec(&c, self, (size_t)(slash - self), names[i])))
            return give_up(status);
    const char *path = getenv("PATH");
    for (size_t i = 0; i < n_names; i++) {
        for (const char *dir = path ? path : DEFAULT_PATH; *dir;) {
            size_t len = strcspn(dir, ":");
            /* Absolute directories only: never an interpreter from the current one. */
            if (dir[0] == '/' && (status = try_exec(&c, dir, len, names[i])))
                return give_up(status);
            dir += len + (dir[len] == ':');
        }
    }
    fprintf(stderr, "xcr0run: no Python interpreter found: no %s%s %s%s%sin PATH\n",
            names[0], n_names > 1 ? " or python3" : "", slash ? "beside " : "",
            slash ? self : "", slash ? " or " : "");
    return give_up(FAILURE);
}
