/* The floor for xcr0run: a minimal C tracer doing the work of xcr0run's compiled core
 * with the same system calls and nothing else. It follows every process and thread
 * (fork, vfork, clone), re-arms CPUID faulting in every new program image the way the
 * core does (code placed at the exec event: mov eax, 158; syscall; int3), and answers
 * every faulting CPUID from a small cache (leaf 7 EBX with AVX-512F cleared; ECX ignored
 * for leaves that have no sub-leaves), checking siginfo and the instruction bytes as the
 * core does. No per-CPU leaves, prefixes, event log or flags: a floor, not a tool.
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
#define SI_KERNEL_CODE 0x80

struct answer { uint32_t leaf, sub, a, b, c, d; int valid; };
static struct answer cache[64];

/* Threads between their exec event and the int3 after the injected call. */
struct arming { pid_t tid; uint64_t code_at, word; struct user_regs_struct saved; };
static struct arming arming[64];

static void native_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4])
{
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static uint32_t normalised_subleaf(uint32_t leaf, uint32_t sub)
{
    int no_subleaves = leaf <= 3 || leaf == 5 || leaf == 6 || (leaf >= 0x80000000u && leaf <= 0x80000008u);
    return no_subleaves ? 0 : sub;
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

static struct arming *arming_of(pid_t tid)
{
    for (size_t i = 0; i < sizeof arming / sizeof arming[0]; i++)
        if (arming[i].tid == tid)
            return &arming[i];
    return NULL;
}

static void arm_at_exec(pid_t tid)
{
    static const uint8_t code[8] = {0xb8, 0x9e, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xcc};
    struct arming *slot = arming_of(0);
    struct user_regs_struct regs;
    uint64_t word;
    if (!slot || ptrace(PTRACE_GETREGS, tid, 0, &regs))
        return;
    slot->tid = tid;
    slot->saved = regs;
    slot->saved.rax = 0;
    slot->saved.orig_rax = (uint64_t)-1;
    slot->code_at = regs.rip & ~7ULL;
    slot->word = (uint64_t)ptrace(PTRACE_PEEKTEXT, tid, slot->code_at, 0);
    memcpy(&word, code, 8);
    ptrace(PTRACE_POKETEXT, tid, slot->code_at, word);
    regs.rip = slot->code_at;
    regs.rdi = ARCH_SET_CPUID;
    regs.rsi = 0;
    ptrace(PTRACE_SETREGS, tid, 0, &regs);
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
    int status, exit_status = 125;
    waitpid(pid, &status, WUNTRACED);
    long options = PTRACE_O_TRACEEXEC | PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK | PTRACE_O_TRACECLONE |
                   PTRACE_O_EXITKILL;
    if (ptrace(PTRACE_SEIZE, pid, 0, options))
        return perror("seize"), 125;
    kill(pid, SIGCONT);
    struct user_regs_struct regs;
    long traps = 0;
    for (;;) {
        pid_t tid = waitpid(-1, &status, __WALL);
        if (tid < 0)
            break; /* ECHILD: the whole tree is gone */
        if (WIFEXITED(status) || WIFSIGNALED(status)) {
            if (tid == pid)
                exit_status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
            continue;
        }
        int sig = WSTOPSIG(status), event = status >> 16, deliver = 0;
        if (event == PTRACE_EVENT_EXEC) {
            arm_at_exec(tid);
        } else if (event == 0 && sig == SIGTRAP && arming_of(tid)) {
            struct arming *a = arming_of(tid);
            ptrace(PTRACE_POKETEXT, tid, a->code_at, a->word);
            ptrace(PTRACE_SETREGS, tid, 0, &a->saved);
            a->tid = 0;
        } else if (event == 0 && sig == SIGSEGV) {
            siginfo_t si;
            ptrace(PTRACE_GETSIGINFO, tid, 0, &si);
            deliver = sig;
            if (si.si_code == SI_KERNEL_CODE && si.si_addr == 0) {
                ptrace(PTRACE_GETREGS, tid, 0, &regs);
                long word = ptrace(PTRACE_PEEKTEXT, tid, regs.rip, 0);
                if ((word & 0xffff) == 0xa20f) {
                    uint32_t leaf = (uint32_t)regs.rax;
                    struct answer *e = lookup(leaf, normalised_subleaf(leaf, (uint32_t)regs.rcx));
                    regs.rax = e->a; regs.rbx = e->b; regs.rcx = e->c; regs.rdx = e->d;
                    regs.rip += 2;
                    ptrace(PTRACE_SETREGS, tid, 0, &regs);
                    traps++;
                    deliver = 0;
                }
            }
        } else if (event == 0) {
            deliver = sig;
        }
        ptrace(PTRACE_CONT, tid, 0, deliver); /* events (fork, clone, first stops): resume */
    }
    fprintf(stderr, "floor_tracer: %ld traps\n", traps);
    return exit_status;
}
