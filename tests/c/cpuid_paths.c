/* Every way to CPUID this file knows of, each printing leaf 7 EBX as "PATH l7b=..":
 * the plain instruction, prefixed encodings (the fault's RIP is the first prefix), and
 * a child made with CLONE_UNTRACED, which a tracer is not told about. */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#define CLONE_UNTRACED_FLAG 0x00800000

#define CPUID_WITH(prefix)                                                                    \
    static unsigned l7b_##prefix(void)                                                        \
    {                                                                                         \
        unsigned a = 7, b, c = 0, d;                                                          \
        __asm__ volatile(PREFIX_##prefix ".byte 0x0f, 0xa2"                                  \
                         : "+a"(a), "=b"(b), "+c"(c), "=d"(d));                               \
        return b;                                                                             \
    }

#define PREFIX_plain ""
#define PREFIX_opsize ".byte 0x66\n"
#define PREFIX_rep_rex ".byte 0xf3, 0x48\n"
#define PREFIX_segments ".byte 0x2e, 0x3e, 0x26, 0x64, 0x65, 0x36, 0x67\n"
CPUID_WITH(plain)
CPUID_WITH(opsize)
CPUID_WITH(rep_rex)
CPUID_WITH(segments)

static int untraced_child(void *fd)
{
    char line[64];
    int n = snprintf(line, sizeof line, "untraced l7b=%#x\n", l7b_plain());
    write(*(int *)fd, line, n);
    return 0;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("plain l7b=%#x\n", l7b_plain());
    printf("opsize l7b=%#x\n", l7b_opsize());
    printf("rep_rex l7b=%#x\n", l7b_rep_rex());
    printf("segments l7b=%#x\n", l7b_segments());
    int fd = 1;
    static char stack[1 << 16];
    pid_t child = clone(untraced_child, stack + sizeof stack, CLONE_UNTRACED_FLAG | SIGCHLD, &fd);
    int status = 0;
    waitpid(child, &status, 0);
    printf("untraced status=%d\n", status);
    return 0;
}
