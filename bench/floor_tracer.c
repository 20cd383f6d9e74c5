/* The floor for xcr0run's per-trap cost: a minimal C tracer doing the same work with the
 * same system calls. It follows one program (no fork/clone handling), re-arms CPUID
 * faulting after each exec by injecting arch_prctl at execve's syscall-exit stop, and
 * answers every faulting CPUID from a small cache (leaf 7 EBX with AVX-512F cleared),
 * checking siginfo and the instruction bytes exactly as the supervisor does.
 *   floor_tracer PROGRAM ARGS... */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

#define ARCH_SET_CPUID 0x1012

struct answer { uint32_t leaf, sub, a, b, c, d; int valid; };
static struct answer cache[64];

static void native_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4])
{
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static struct answer *lookup(uint32_t leaf, uint32_t sub)
{
    struct answer *e = &cache[(leaf * 31 + sub) & 63];
    if (!e->valid || e->leaf != leaf || e->sub != sub) {
        uint32_t r[4];
        native_cpuid(leaf, sub, r);
        if (leaf == 7 && sub == 0)
            r[1] &= ~(1u << 16); /* hide AVX-512F, as a mask would */
        *e = (struct answer){leaf, sub, r[0], r[1], r[2], r[3], 1};
    }
    return e;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    pid_t pid = fork();
    if (pid == 0) {
        raise(SIGSTOP);
        execvp(argv[1], argv + 1);
        _exit(127);
    }
    int status;
    waitpid(pid, &status, WUNTRACED);
    if (ptrace(PTRACE_SEIZE, pid, 0, PTRACE_O_TRACEEXEC | PTRACE_O_TRACESYSGOOD | PTRACE_O_EXITKILL))
        return perror("seize"), 125;
    kill(pid, SIGCONT);
    struct user_regs_struct regs, saved;
    long saved_word = 0;
    int phase = 0; /* 0 running, 1 after exec, 2 inject enter, 3 inject exit */
    long traps = 0;
    for (;;) {
        if (waitpid(pid, &status, __WALL) < 0)
            break;
        if (WIFEXITED(status) || WIFSIGNALED(status))
            break;
        int sig = WSTOPSIG(status), event = status >> 16, deliver = 0;
        if (event == PTRACE_EVENT_EXEC) {
            phase = 1;
            ptrace(PTRACE_SYSCALL, pid, 0, 0);
            continue;
        }
        if (sig == (SIGTRAP | 0x80)) {
            ptrace(PTRACE_GETREGS, pid, 0, &regs);
            if (phase == 1) {
                saved = regs;
                saved_word = ptrace(PTRACE_PEEKTEXT, pid, regs.rip, 0);
                ptrace(PTRACE_POKETEXT, pid, regs.rip, (saved_word & ~0xffffL) | 0x050f);
                regs.rax = SYS_arch_prctl;
                regs.rdi = ARCH_SET_CPUID;
                regs.rsi = 0;
                ptrace(PTRACE_SETREGS, pid, 0, &regs);
                phase = 2;
            } else if (phase == 2) {
                phase = 3;
            } else if (phase == 3) {
                ptrace(PTRACE_POKETEXT, pid, saved.rip, saved_word);
                ptrace(PTRACE_SETREGS, pid, 0, &saved);
                phase = 0;
                ptrace(PTRACE_CONT, pid, 0, 0);
                continue;
            }
            ptrace(PTRACE_SYSCALL, pid, 0, 0);
            continue;
        }
        if (sig == SIGSEGV && event == 0) {
            siginfo_t si;
            ptrace(PTRACE_GETSIGINFO, pid, 0, &si);
            if (si.si_code == 0x80 && si.si_addr == 0) {
                ptrace(PTRACE_GETREGS, pid, 0, &regs);
                long word = ptrace(PTRACE_PEEKTEXT, pid, regs.rip, 0);
                if ((word & 0xffff) == 0xa20f) {
                    struct answer *e = lookup(regs.rax, regs.rcx);
                    regs.rax = e->a; regs.rbx = e->b; regs.rcx = e->c; regs.rdx = e->d;
                    regs.rip += 2;
                    ptrace(PTRACE_SETREGS, pid, 0, &regs);
                    ptrace(PTRACE_CONT, pid, 0, 0);
                    traps++;
                    continue;
                }
            }
            deliver = sig;
        } else if (event == 0) {
            deliver = sig;
        }
        ptrace(PTRACE_CONT, pid, 0, deliver);
    }
    fprintf(stderr, "floor_tracer: %ld traps\n", traps);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
