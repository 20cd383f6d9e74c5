/* A program that manages CPUID faulting itself (as rr's replayer or a sandbox might):
 * ARCH_GET_CPUID and ARCH_SET_CPUID must behave as without xcr0run, and switching
 * faulting off must not unmask the view. Prints one line per step; leaf 7 EBX is
 * printed separately as "l7b=..." so the caller can check it against the view. */
#define _GNU_SOURCE
#include <cpuid.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define ARCH_GET_CPUID 0x1011
#define ARCH_SET_CPUID 0x1012

static sigjmp_buf back;
static volatile sig_atomic_t faulted;

static void on_segv(int sig, siginfo_t *info, void *ctx)
{
    (void)sig;
    (void)ctx;
    faulted = info->si_code;
    siglongjmp(back, 1);
}

static unsigned leaf7_ebx(void)
{
    unsigned a, b, c, d;
    __cpuid_count(7, 0, a, b, c, d);
    return b;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, NULL);

    printf("get: %ld\n", syscall(SYS_arch_prctl, ARCH_GET_CPUID, 0));
    printf("l7b=%#x\n", leaf7_ebx());
    printf("set 1: %ld\n", syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1));
    printf("get: %ld\n", syscall(SYS_arch_prctl, ARCH_GET_CPUID, 0));
    printf("l7b=%#x\n", leaf7_ebx());
    long armed = syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    printf("set 0: %ld\n", armed);
    printf("get: %ld\n", syscall(SYS_arch_prctl, ARCH_GET_CPUID, 0));
    if (armed == 0) {
        faulted = 0;
        if (sigsetjmp(back, 1) == 0)
            leaf7_ebx();
        printf("cpuid while armed: si_code=%#x\n", (unsigned)faulted);
    }
    pid_t child = fork();
    if (child == 0) {
        printf("child get: %ld\n", syscall(SYS_arch_prctl, ARCH_GET_CPUID, 0));
        _exit(0);
    }
    waitpid(child, NULL, 0);
    printf("set 1: %ld\n", syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1));
    printf("l7b=%#x\n", leaf7_ebx());
    return 0;
}
