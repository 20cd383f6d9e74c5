/* The limit for any design that keeps ptrace out of the trap: the program arms CPUID
 * faulting on itself and answers each trapped CPUID in its own SIGSEGV handler (from a
 * value read before arming: a CPUID in the handler would trap again). Runs CPUID (leaf 7)
 * N times like cpuid_loop and prints the mean cost: "cpuid_ns <mean>".
 *   sigsegv_cpuid [N] */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#define ARCH_SET_CPUID 0x1012

static unsigned leaf7[4];

static void on_sigsegv(int sig, siginfo_t *info, void *context)
{
    ucontext_t *uc = context;
    greg_t *r = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    if (info->si_code != 0x80 || ip[0] != 0x0f || ip[1] != 0xa2 || (unsigned)r[REG_RAX] != 7) {
        signal(sig, SIG_DFL); /* a real fault, or a leaf this sketch does not keep */
        return;
    }
    r[REG_RAX] = leaf7[0];
    r[REG_RBX] = leaf7[1] & ~(1u << 16); /* hide AVX-512F, as a mask would */
    r[REG_RCX] = leaf7[2];
    r[REG_RDX] = leaf7[3];
    r[REG_RIP] += 2;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 10000;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigsegv;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, NULL);
    __asm__ volatile("cpuid" : "=a"(leaf7[0]), "=b"(leaf7[1]), "=c"(leaf7[2]), "=d"(leaf7[3]) : "a"(7), "c"(0));
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0)) {
        perror("arch_prctl(ARCH_SET_CPUID)");
        return 125;
    }
    struct timespec a, b;
    unsigned eax, ebx, ecx, edx, sink = 0;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
        sink += ebx;
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n;
    printf("cpuid_ns %.1f %u\n", ns, sink & 1);
    return 0;
}
