/* Prints what CPUID and XGETBV say in this process, from the main thread and from N
 * more threads, then optionally execs another program:
 *   cpuid_view [-t THREADS] [-e PROGRAM ARGS...]
 * One line per thread: "view pid=P tid=T l0b=.. l0c=.. l0d=.. l1a=.. l1c=.. l1d=.. l7b=.. l7c=.. l7d=.. l71a=..
 * d0a=.. d0b=.. e1d=.. xcr0=.. cpuid_allowed=N" */
#define _GNU_SOURCE
#include <cpuid.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static uint64_t xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

static void *report(void *unused)
{
    unsigned a0, b0, c0, d0, a1, b1, c1, d1, a7, b7, c7, d7, a71, b71, c71, d71, ad, bd, cd, dd;
    unsigned ae, be, ce, de;
    (void)unused;
    __cpuid_count(0, 0, a0, b0, c0, d0);
    __cpuid_count(1, 0, a1, b1, c1, d1);
    __cpuid_count(7, 0, a7, b7, c7, d7);
    __cpuid_count(7, 1, a71, b71, c71, d71);
    __cpuid_count(0xd, 0, ad, bd, cd, dd);
    __cpuid_count(0x80000001, 0, ae, be, ce, de);
    long allowed = syscall(SYS_arch_prctl, 0x1011, 0);
    printf("view pid=%d tid=%ld l0b=%#x l0c=%#x l0d=%#x l1a=%#x l1c=%#x l1d=%#x l7b=%#x l7c=%#x l7d=%#x l71a=%#x d0a=%#x "
           "d0b=%#x e1d=%#x xcr0=%#llx cpuid_allowed=%ld\n",
           getpid(), (long)syscall(SYS_gettid), b0, c0, d0, a1, c1, d1, b7, c7, d7, a71, ad, bd, de,
           (unsigned long long)xgetbv0(), allowed);
    fflush(stdout);
    return NULL;
}

int main(int argc, char **argv)
{
    int threads = 0, i = 1;
    if (i + 1 < argc && strcmp(argv[i], "-t") == 0) {
        threads = atoi(argv[i + 1]);
        i += 2;
    }
    report(NULL);
    for (int t = 0; t < threads; t++) {
        pthread_t th;
        pthread_create(&th, NULL, report, NULL);
        pthread_join(th, NULL);
    }
    if (i + 1 < argc && strcmp(argv[i], "-e") == 0) {
        execv(argv[i + 1], argv + i + 1);
        perror("execv");
        return 126;
    }
    return 0;
}
