/* What a thread sees of XCR0, from every side, for the ARCH_SET_XCR0 tests.
 *
 *   xcr0_facts show             xcr0=0x.. xinuse=.. osxsave=.. size_enabled=.. size_max=..
 *   xcr0_facts threads          xcr0 in a new thread (pthread) and in a clone(CLONE_VM) one
 *   xcr0_facts fork             xcr0 in a forked child
 *   xcr0_facts exec N           re-executes itself N times, then "show"
 *   xcr0_facts avx              runs an AVX instruction (SIGILL where XCR0 lacks AVX)
 *   xcr0_facts xsave            XSAVE with every bit requested into a patterned buffer
 *   xcr0_facts sigframe         the XSAVE area of a signal frame (sw bytes, XSTATE_BV)
 *   xcr0_facts ptrace           NT_X86_XSTATE of a stopped child (XCR0 at 464, XSTATE_BV)
 *   xcr0_facts getxcr0 CODE     arch_prctl(CODE) (ARCH_GET_XCR0): the kernel's value
 *   xcr0_facts setxcr0 CODE V   arch_prctl(CODE, V) right here, errno on failure
 *   xcr0_facts dirty-avx CODE V dirty the upper YMM halves, then arch_prctl(CODE, V)
 *   xcr0_facts mixed CODE V N   a thread runs with XCR0 = V for N yields while the main
 *                               thread keeps the full one; each checks xgetbv every time
 *
 * Built without -mavx: the program itself must run under XCR0 = x87|SSE. */
#define _GNU_SOURCE
#include <cpuid.h>
#include <elf.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <ucontext.h>
#include <unistd.h>

#ifndef NT_X86_XSTATE
#define NT_X86_XSTATE 0x202
#endif

static uint64_t xgetbv(uint32_t index)
{
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(index));
    return eax | (uint64_t)edx << 32;
}

static int has_xgetbv1(void)
{
    unsigned a, b, c, d;
    __cpuid_count(0xd, 1, a, b, c, d);
    return a & 4;
}

static void show(const char *where)
{
    unsigned a, b, c, d, osxsave;
    __cpuid(1, a, b, c, d);
    osxsave = (c >> 27) & 1;
    __cpuid_count(0xd, 0, a, b, c, d);
    printf("%s xcr0=%#llx osxsave=%u size_enabled=%u size_max=%u", where,
           (unsigned long long)xgetbv(0), osxsave, b, c);
    if (has_xgetbv1())
        printf(" xinuse=%#llx", (unsigned long long)xgetbv(1));
    printf("\n");
    fflush(stdout);
}

static void *thread_main(void *arg)
{
    show(arg);
    return NULL;
}

static int clone_main(void *arg)
{
    show(arg);
    return 0;
}

static long arch_prctl(long code, unsigned long arg)
{
    return syscall(SYS_arch_prctl, code, arg);
}

/* Standard-format XSAVE area, 64-byte aligned, big enough for any XCR0. */
static unsigned char area[16384] __attribute__((aligned(64)));

static void xsave_all(void *buf)
{
    __asm__ volatile("xsave (%0)" ::"r"(buf), "a"(-1), "d"(-1) : "memory");
}

static uint64_t u64_at(const void *base, size_t off)
{
    uint64_t v;
    memcpy(&v, (const char *)base + off, sizeof v);
    return v;
}

static void do_xsave(void)
{
    unsigned a, size, max, d;
    __cpuid_count(0xd, 0, a, size, max, d);
    memset(area, 0xa5, sizeof area);
    memset(area + 512, 0, 64); /* header: XSAVE leaves bits outside RFBM alone */
    xsave_all(area);
    uint64_t bv = u64_at(area, 512);
    /* Bytes past the area XCR0 enables must not have been written. */
    size_t untouched = 0, beyond = sizeof area - size;
    for (size_t i = size; i < sizeof area; i++)
        untouched += area[i] == 0xa5;
    /* Where AVX's component lives in the standard format. */
    unsigned ymm_size, ymm_off, c2, d2, ymm_untouched = 0;
    __cpuid_count(0xd, 2, ymm_size, ymm_off, c2, d2);
    for (unsigned i = 0; i < ymm_size && ymm_off + i < sizeof area; i++)
        ymm_untouched += area[ymm_off + i] == 0xa5;
    printf("xsave xstate_bv=%#llx size_enabled=%u size_max=%u untouched_beyond=%zu/%zu "
           "ymm_untouched=%u/%u\n",
           (unsigned long long)bv, size, max, untouched, beyond, ymm_untouched, ymm_size);
}

static void on_usr1(int sig, siginfo_t *si, void *ctx)
{
    (void)sig;
    (void)si;
    ucontext_t *uc = ctx;
    const unsigned char *fp = (const unsigned char *)uc->uc_mcontext.fpregs;
    /* struct _fpx_sw_bytes at 464: magic1, extended_size, xfeatures, xstate_size */
    uint32_t magic1, extended, xstate_size;
    memcpy(&magic1, fp + 464, 4);
    memcpy(&extended, fp + 468, 4);
    memcpy(&xstate_size, fp + 480, 4);
    printf("sigframe magic1=%#x xfeatures=%#llx xstate_bv=%#llx xstate_size=%u\n", magic1,
           (unsigned long long)u64_at(fp, 472), (unsigned long long)u64_at(fp, 512),
           xstate_size);
    (void)extended;
}

static void sigframe(void)
{
    struct sigaction sa = {.sa_sigaction = on_usr1, .sa_flags = SA_SIGINFO};
    sigaction(SIGUSR1, &sa, NULL);
    raise(SIGUSR1);
    show("after-signal");
}

static void do_ptrace(void)
{
    pid_t pid = fork();
    if (pid == 0) {
        ptrace(PTRACE_TRACEME, 0, 0, 0);
        raise(SIGSTOP);
        _exit(0);
    }
    int status;
    waitpid(pid, &status, 0);
    static unsigned char buf[16384];
    struct iovec iov = {buf, sizeof buf};
    if (ptrace(PTRACE_GETREGSET, pid, NT_X86_XSTATE, &iov) != 0) {
        perror("PTRACE_GETREGSET");
        exit(1);
    }
    printf("ptrace xcr0=%#llx xstate_bv=%#llx len=%zu\n", (unsigned long long)u64_at(buf, 464),
           (unsigned long long)u64_at(buf, 512), iov.iov_len);
    /* Writing back a header that claims AVX state must fail where XCR0 lacks AVX. */
    uint64_t bv = u64_at(buf, 512) | 4;
    memcpy(buf + 512, &bv, 8);
    long rc = ptrace(PTRACE_SETREGSET, pid, NT_X86_XSTATE, &iov);
    printf("ptrace_set avx rc=%ld errno=%d\n", rc, rc ? errno : 0);
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
}

/* The restricted thread calls no library code (glibc may pick AVX string functions). */
struct mixed {
    long code;
    unsigned long value, full;
    long n, bad, rc;
};

static uint64_t raw_set(long code, unsigned long value)
{
    long r;
    __asm__ volatile("syscall"
                     : "=a"(r)
                     : "a"((long)SYS_arch_prctl), "D"(code), "S"(value)
                     : "rcx", "r11", "memory");
    return r;
}

static void raw_yield(void)
{
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"((long)SYS_sched_yield) : "rcx", "r11", "memory");
}

static void *mixed_thread(void *arg)
{
    struct mixed *m = arg;
    m->rc = raw_set(m->code, m->value);
    for (long i = 0; i < m->n && !m->rc; i++) {
        m->bad += xgetbv(0) != m->value;
        raw_yield();
    }
    raw_set(m->code, m->full);
    return NULL;
}

static void mixed(long code, unsigned long value, long n)
{
    struct mixed m = {code, value, xgetbv(0), n, 0, 0};
    long bad_main = 0;
    pthread_t t;
    pthread_create(&t, NULL, mixed_thread, &m);
    for (long i = 0; i < n; i++) {
        bad_main += xgetbv(0) != m.full;
        raw_yield();
    }
    pthread_join(t, NULL);
    printf("mixed rc=%ld thread_bad=%ld main_bad=%ld n=%ld after=%#llx\n", m.rc, m.bad, bad_main,
           n, (unsigned long long)xgetbv(0));
}

int main(int argc, char **argv)
{
    const char *cmd = argc > 1 ? argv[1] : "show";
    if (!strcmp(cmd, "show")) {
        show("main");
    } else if (!strcmp(cmd, "threads")) {
        show("main");
        pthread_t t;
        pthread_create(&t, NULL, thread_main, "thread");
        pthread_join(t, NULL);
        static char stack[65536] __attribute__((aligned(16)));
        pid_t tid = clone(clone_main, stack + sizeof stack,
                          CLONE_VM | CLONE_FS | CLONE_FILES | SIGCHLD, "clone");
        waitpid(tid, NULL, 0);
    } else if (!strcmp(cmd, "fork")) {
        show("main");
        pid_t pid = fork();
        if (pid == 0) {
            show("child");
            _exit(0);
        }
        waitpid(pid, NULL, 0);
    } else if (!strcmp(cmd, "exec")) {
        int n = argc > 2 ? atoi(argv[2]) : 1;
        if (n <= 0) {
            show("exec");
            return 0;
        }
        char num[16];
        snprintf(num, sizeof num, "%d", n - 1);
        execl("/proc/self/exe", argv[0], "exec", num, (char *)NULL);
        perror("execl");
        return 1;
    } else if (!strcmp(cmd, "avx")) {
        show("before-avx");
        __asm__ volatile("vxorps %%ymm0, %%ymm0, %%ymm0" ::: "xmm0");
        printf("avx ran\n");
    } else if (!strcmp(cmd, "xsave")) {
        do_xsave();
    } else if (!strcmp(cmd, "sigframe")) {
        sigframe();
    } else if (!strcmp(cmd, "ptrace")) {
        do_ptrace();
    } else if (!strcmp(cmd, "getxcr0") && argc > 2) {
        long r = arch_prctl(strtol(argv[2], NULL, 0), 0);
        printf("getxcr0 rc=%#lx errno=%d xgetbv=%#llx\n", r, r < 0 ? errno : 0,
               (unsigned long long)xgetbv(0));
    } else if (!strcmp(cmd, "setxcr0") && argc > 3) {
        /* Bind printf and errno before XCR0 changes: glibc's lazy-binding trampoline
         * sized its XSAVE area for the XCR0 it started with, and one that grows
         * afterwards would overrun it (a crash in _dl_fixup). */
        long code = strtol(argv[2], NULL, 0);
        unsigned long value = strtoul(argv[3], NULL, 0);
        printf("%s ", cmd);
        errno = 0;
        long r = arch_prctl(code, value);
        printf("rc=%ld errno=%d xgetbv=%#llx\n", r, r < 0 ? errno : 0,
               (unsigned long long)xgetbv(0));
    } else if (!strcmp(cmd, "dirty-avx") && argc > 3) {
        long code = strtol(argv[2], NULL, 0);
        unsigned long value = strtoul(argv[3], NULL, 0);
        long r;
        /* Upper half of ymm15 non-zero, then straight into the syscall. */
        __asm__ volatile("vpcmpeqd %%ymm15, %%ymm15, %%ymm15\n\t"
                         "syscall"
                         : "=a"(r)
                         : "a"((long)SYS_arch_prctl), "D"(code), "S"(value)
                         : "rcx", "r11", "memory", "xmm15");
        printf("dirty-avx rc=%ld xgetbv=%#llx\n", r, (unsigned long long)xgetbv(0));
    } else if (!strcmp(cmd, "mixed") && argc > 4) {
        mixed(strtol(argv[2], NULL, 0), strtoul(argv[3], NULL, 0), atol(argv[4]));
    } else {
        fprintf(stderr, "usage: %s show|threads|fork|exec N|avx|xsave|sigframe|ptrace|...\n",
                argv[0]);
        return 2;
    }
    return 0;
}
