/* xcr0run's compiled core: the supervisor's hot stop loop, in C.
 *
 * Python keeps every policy; this file only does the three things that happen thousands
 * of times per program tree, without returning to the interpreter:
 *   - answer a CPUID that trapped (CPUID faulting) from a flat table Python handed down;
 *   - keep the fork/vfork/clone bookkeeping (new tids, their flags, an event log);
 *   - re-arm CPUID faulting (and other arch_prctl calls) in every new program image.
 * Every other stop goes back to the caller untouched, as (tid, raw wait status).
 *
 * Loaded with ctypes by xcr0run/_core.py (no Python API here, so no Python headers are
 * needed to build it). Kernel facts this relies on: docs/DESIGN.md and kernel-notes.md.
 * x86-64 Linux only. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define XC_API __attribute__((visibility("default")))
#define XC_ABI_VERSION 2

/* <linux/ptrace.h> values glibc may lack */
#ifndef PTRACE_EVENT_STOP
#define PTRACE_EVENT_STOP 128
#endif
#ifndef PTRACE_EVENT_SECCOMP
#define PTRACE_EVENT_SECCOMP 7
#endif
#define XC_PTRACE_GET_RSEQ_CONFIGURATION 0x420f /* Linux 5.13 */
#ifndef SI_KERNEL
#define SI_KERNEL 0x80
#endif
#ifndef SI_TIMER
#define SI_TIMER (-2)
#endif
#ifndef SIGEV_THREAD_ID
#define SIGEV_THREAD_ID 4
#endif
#define XC_CLONE_THREAD 0x00010000 /* <linux/sched.h> */
#define XC_USER32_CS 0x23          /* a 32-bit (ia32) program's code segment */
#define XC_SYS_CLONE_64 56         /* <asm/unistd_64.h> */
#define XC_SYS_CLONE_32 120        /* <asm/unistd_32.h> */
#define XC_SYS_CLONE3 435          /* the same number in both */

/* -- the ABI shared with _core.py (keep the two in step; XC_ABI_VERSION guards it) -- */

enum xc_flag { XC_ANSWER = 1 }; /* per tid: the core may answer this thread's CPUID traps */

enum xc_reason {
    XC_HANDLED = 0,      /* internal: the stop was dealt with, keep waiting */
    XC_STOP_STATUS = 1,  /* a stop or exit the core does not handle: status as waitpid gave it */
    XC_STOP_CPUID = 2,   /* a CPUID trap the core did not answer (flag clear, or no answer) */
    XC_STOP_EXEC = 3,    /* stop_at_exec: an exec event, re-arming prepared; resume with CONT */
    XC_STOP_ARM_FAILED = 4, /* a required after-exec call failed; image restored, still stopped */
    XC_STOP_NO_TRACEES = 5, /* waitpid: ECHILD */
    XC_STOP_WOKEN = 6,   /* the timeout passed, or xc_request_return() */
    XC_STOP_EINTR = 7,   /* waitpid was interrupted by another signal (the caller's handlers) */
    XC_STOP_ERROR = 8,   /* a call failed with `err` (not ESRCH); the tracee is still stopped */
};

struct xc_stop {
    int32_t reason, tid, status, err;
    uint32_t leaf, subleaf; /* XC_STOP_CPUID: the (normalised) key asked for */
    int32_t insn_len;       /* XC_STOP_CPUID: bytes of the trapping instruction */
    int32_t cpu;            /* XC_STOP_CPUID: the CPU used for a per-CPU leaf, or -1 */
    int64_t result;         /* XC_STOP_ARM_FAILED: the call's return value (-errno) */
    uint64_t code;          /* XC_STOP_ARM_FAILED: the arch_prctl code that failed */
};

enum xc_event_kind {
    XC_EV_FORK = 1,          /* tid forked other */
    XC_EV_VFORK = 2,
    XC_EV_CLONE_THREAD = 3,  /* clone with CLONE_THREAD: other is a thread of tid's process */
    XC_EV_CLONE_PROCESS = 4, /* clone without it: a new process */
    XC_EV_EXEC = 5,          /* tid exec'd; other is the tid it had before (non-leader exec) */
    XC_EV_CALL_FAILED = 6,   /* an optional after-exec call failed: code, result */
};

struct xc_event {
    int32_t kind, tid, other, pad;
    uint64_t code;
    int64_t result;
};

struct xc_count {
    uint32_t leaf, subleaf;
    uint64_t traps;
};

struct xc_stats {
    uint64_t stops;     /* wait statuses seen */
    uint64_t answered;  /* CPUID traps answered */
    uint64_t returned;  /* times run() returned */
    uint64_t arms;      /* program images re-armed */
    uint64_t vanished;  /* stops dropped because the thread was killed meanwhile (ESRCH) */
};

/* -- the answer table: (leaf, normalised sub-leaf) -> registers, optionally per CPU -- */

struct answer {
    uint64_t key; /* leaf << 32 | subleaf; a slot is free when `used` is 0 */
    uint8_t used, has_flat;
    int8_t uniform; /* per-CPU entries: -1 not yet known, 1 every probed CPU agrees */
    uint32_t regs[4];
    uint32_t *per_cpu; /* ncpus * 4 registers, NULL if not per-CPU */
    uint8_t *cpu_known; /* which CPUs Python filled */
    uint64_t traps;
};

/* -- the tracee table: tid -> state -- */

/* T_HELD: a new child whose first stop came before its parent's fork or clone event: it
 * stays stopped until the event says whose flags it inherits (so it never runs a CPUID
 * with flags that are not its own). */
enum tracee_state { T_RUNNING = 0, T_NEW = 1, T_ARMING = 2, T_HELD = 3 };
enum rseq_state { RSEQ_UNKNOWN = 0, RSEQ_KNOWN = 1, RSEQ_UNSUPPORTED = 2 };

struct tracee {
    pid_t tid; /* 0: free slot */
    uint8_t flags, state, call, rseq;
    uint8_t inherited;        /* flags came from the parent's event, not the default */
    uint8_t trap_len;         /* the last trap that went up, for xc_complete_cpuid */
    uint32_t trap_leaf, trap_subleaf;
    uint64_t rseq_addr;
    uint64_t code_at, saved_word; /* T_ARMING: where our code sits and what it covered */
    struct user_regs_struct *saved;
};

/* waitpid(-1) reports the newest tracees first, so a tree that keeps making threads
 * would starve the oldest (the program's main thread): every stop pending at once is
 * collected, then handled in turn. */
struct pending {
    pid_t tid;
    int status;
};

struct exec_call {
    uint64_t code, arg;
    int required;
};

struct xc_core {
    int ncpus;
    uint32_t default_flags;
    unsigned long options;
    int stop_at_exec;
    struct answer *answers;
    size_t answer_cap, answer_len;
    uint8_t ignores_ecx[3][32]; /* bitmaps: leaves 0x0-0xff, 0x40000000-ff, 0x80000000-ff */
    struct tracee *tracees;
    size_t tracee_cap, tracee_len;
    struct exec_call calls[8];
    int ncalls;
    struct xc_event *events;
    size_t event_len, event_cap;
    struct pending *queue; /* stops collected by waitpid, handled in order */
    size_t queue_head, queue_len, queue_cap;
    struct xc_stats stats;
    volatile sig_atomic_t timer_fired; /* set by the wake signal's handler */
    volatile sig_atomic_t return_requested; /* set by xc_request_return */
    int wake_signal;
    struct sigaction old_action;
    int timer_id; /* kernel timer id, -1 until created */
    pid_t timer_tid;
};

/* ------------------------------------------------------------------ hashing helpers */

static size_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (size_t)x;
}

static int ecx_bitmap(uint32_t leaf, int *index)
{
    uint32_t base = leaf & 0xffffff00u;
    *index = base == 0 ? 0 : base == 0x40000000u ? 1 : base == 0x80000000u ? 2 : -1;
    return *index;
}

static uint32_t normalise(const struct xc_core *core, uint32_t leaf, uint32_t subleaf)
{
    int i;
    if (ecx_bitmap(leaf, &i) < 0)
        return subleaf;
    return core->ignores_ecx[i][(leaf & 0xff) >> 3] >> (leaf & 7) & 1 ? 0 : subleaf;
}

static struct answer *answer_find(const struct xc_core *core, uint64_t key)
{
    if (!core->answer_cap)
        return NULL;
    size_t mask = core->answer_cap - 1;
    for (size_t i = mix(key) & mask;; i = (i + 1) & mask) {
        struct answer *a = &core->answers[i];
        if (!a->used)
            return NULL;
        if (a->key == key)
            return a;
    }
}

static struct answer *answer_slot(struct xc_core *core, uint64_t key)
{
    struct answer *a = answer_find(core, key);
    if (a)
        return a;
    if ((core->answer_len + 1) * 2 > core->answer_cap) { /* keep the load under 1/2 */
        size_t cap = core->answer_cap ? core->answer_cap * 2 : 256;
        struct answer *old = core->answers, *fresh = calloc(cap, sizeof *fresh);
        if (!fresh)
            return NULL;
        size_t old_cap = core->answer_cap;
        core->answers = fresh;
        core->answer_cap = cap;
        for (size_t i = 0; i < old_cap; i++) {
            if (!old[i].used)
                continue;
            size_t j = mix(old[i].key) & (cap - 1);
            while (fresh[j].used)
                j = (j + 1) & (cap - 1);
            fresh[j] = old[i];
        }
        free(old);
    }
    size_t mask = core->answer_cap - 1, i = mix(key) & mask;
    while (core->answers[i].used)
        i = (i + 1) & mask;
    a = &core->answers[i];
    a->used = 1;
    a->key = key;
    a->uniform = -1;
    core->answer_len++;
    return a;
}

/* Tracees are deleted, so the table uses backward-shift deletion: pointers into it are
 * invalid after any insert or delete; callers find a tid again after mutating. */
static struct tracee *tracee_find(const struct xc_core *core, pid_t tid)
{
    if (!core->tracee_cap)
        return NULL;
    size_t mask = core->tracee_cap - 1;
    for (size_t i = mix((uint64_t)tid) & mask;; i = (i + 1) & mask) {
        struct tracee *t = &core->tracees[i];
        if (!t->tid)
            return NULL;
        if (t->tid == tid)
            return t;
    }
}

static struct tracee *tracee_insert(struct xc_core *core, pid_t tid, uint32_t flags, int state)
{
    struct tracee *t = tracee_find(core, tid);
    if (t)
        return t;
    if ((core->tracee_len + 1) * 2 > core->tracee_cap) {
        size_t cap = core->tracee_cap ? core->tracee_cap * 2 : 64;
        struct tracee *old = core->tracees, *fresh = calloc(cap, sizeof *fresh);
        if (!fresh)
            return NULL;
        size_t old_cap = core->tracee_cap;
        core->tracees = fresh;
        core->tracee_cap = cap;
        for (size_t i = 0; i < old_cap; i++) {
            if (!old[i].tid)
                continue;
            size_t j = mix((uint64_t)old[i].tid) & (cap - 1);
            while (fresh[j].tid)
                j = (j + 1) & (cap - 1);
            fresh[j] = old[i];
        }
        free(old);
    }
    size_t mask = core->tracee_cap - 1, i = mix((uint64_t)tid) & mask;
    while (core->tracees[i].tid)
        i = (i + 1) & mask;
    t = &core->tracees[i];
    memset(t, 0, sizeof *t);
    t->tid = tid;
    t->flags = (uint8_t)flags;
    t->state = (uint8_t)state;
    core->tracee_len++;
    return t;
}

static void tracee_delete(struct xc_core *core, pid_t tid)
{
    struct tracee *t = tracee_find(core, tid);
    if (!t)
        return;
    free(t->saved);
    size_t mask = core->tracee_cap - 1, hole = (size_t)(t - core->tracees);
    memset(t, 0, sizeof *t);
    core->tracee_len--;
    for (size_t i = (hole + 1) & mask; core->tracees[i].tid; i = (i + 1) & mask) {
        size_t home = mix((uint64_t)core->tracees[i].tid) & mask;
        /* move i into the hole unless its home lies cyclically in (hole, i] */
        if ((i > hole) ? (home <= hole || home > i) : (home <= hole && home > i)) {
            core->tracees[hole] = core->tracees[i];
            memset(&core->tracees[i], 0, sizeof core->tracees[i]);
            hole = i;
        }
    }
}

/* A growable array doubled (64 entries at first): the new block, with *cap updated, or
 * NULL with the old one left as it was. */
static void *grow(void *items, size_t *cap, size_t size)
{
    size_t more = *cap ? *cap * 2 : 64;
    void *grown = realloc(items, more * size);
    if (grown)
        *cap = more;
    return grown;
}

static int push_event(struct xc_core *core, struct xc_event ev)
{
    if (core->event_len == core->event_cap) {
        struct xc_event *grown = grow(core->events, &core->event_cap, sizeof *grown);
        if (!grown)
            return -1;
        core->events = grown;
    }
    core->events[core->event_len++] = ev;
    return 0;
}

static int queue_push(struct xc_core *core, pid_t tid, int status)
{
    if (core->queue_head + core->queue_len == core->queue_cap) {
        if (core->queue_head) { /* slide the live part to the front */
            memmove(core->queue, core->queue + core->queue_head,
                    core->queue_len * sizeof *core->queue);
            core->queue_head = 0;
        } else {
            struct pending *grown = grow(core->queue, &core->queue_cap, sizeof *grown);
            if (!grown)
                return -1;
            core->queue = grown;
        }
    }
    core->queue[core->queue_head + core->queue_len++] = (struct pending){tid, status};
    return 0;
}

/* A stop Python collected itself (its own waitpid on one thread): handled in turn by the
 * next run(), as if the core had collected it. 0 or -ENOMEM. */
XC_API int xc_requeue(struct xc_core *core, pid_t tid, int status)
{
    return queue_push(core, tid, status) ? -ENOMEM : 0;
}

/* Whether a stop of `tid` is collected and not handled yet (then the thread is stopped,
 * and a waitpid on it would block). */
XC_API int xc_is_queued(struct xc_core *core, pid_t tid)
{
    for (size_t i = 0; i < core->queue_len; i++)
        if (core->queue[core->queue_head + i].tid == tid)
            return 1;
    return 0;
}

/* ------------------------------------------------------------------ creation, tables */

static void on_wake_signal(int sig, siginfo_t *info, void *context)
{
    (void)sig;
    (void)context;
    if (info->si_code == SI_TIMER && info->si_value.sival_ptr)
        ((struct xc_core *)info->si_value.sival_ptr)->timer_fired = 1;
}

/* ncpus: CPU numbers 0..ncpus-1 may have per-CPU answers. wake_signal: a signal number
 * the core's run() timeout may use (its handler is installed now, restored by xc_free),
 * or 0 for none. */
XC_API struct xc_core *xc_new(int ncpus, uint32_t default_flags, int wake_signal)
{
    if (ncpus < 1 || ncpus > CPU_SETSIZE || wake_signal < 0 || wake_signal >= 65) {
        errno = EINVAL;
        return NULL;
    }
    struct xc_core *core = calloc(1, sizeof *core);
    if (!core)
        return NULL;
    core->ncpus = ncpus;
    core->default_flags = default_flags;
    core->timer_id = -1;
    core->wake_signal = wake_signal;
    if (wake_signal) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_wake_signal;
        sa.sa_flags = SA_SIGINFO; /* no SA_RESTART: waitpid must return EINTR */
        sigemptyset(&sa.sa_mask);
        if (sigaction(wake_signal, &sa, &core->old_action)) {
            free(core);
            return NULL;
        }
    }
    return core;
}

XC_API void xc_free(struct xc_core *core)
{
    if (!core)
        return;
    if (core->timer_id >= 0)
        syscall(SYS_timer_delete, core->timer_id);
    if (core->wake_signal)
        sigaction(core->wake_signal, &core->old_action, NULL);
    for (size_t i = 0; i < core->answer_cap; i++) {
        free(core->answers[i].per_cpu);
        free(core->answers[i].cpu_known);
    }
    for (size_t i = 0; i < core->tracee_cap; i++)
        free(core->tracees[i].saved);
    free(core->answers);
    free(core->tracees);
    free(core->events);
    free(core->queue);
    free(core);
}

XC_API int xc_abi_version(void) { return XC_ABI_VERSION; }

XC_API void xc_set_options(struct xc_core *core, unsigned long options) { core->options = options; }

XC_API void xc_set_stop_at_exec(struct xc_core *core, int yes) { core->stop_at_exec = !!yes; }

/* An arch_prctl(code, arg) to run in every new program image, in the order added. A
 * required call that fails returns XC_STOP_ARM_FAILED; an optional one logs an event. */
XC_API int xc_add_exec_call(struct xc_core *core, uint64_t code, uint64_t arg, int required)
{
    if (core->ncalls == (int)(sizeof core->calls / sizeof core->calls[0]))
        return -ENOSPC;
    core->calls[core->ncalls++] = (struct exec_call){code, arg, !!required};
    return 0;
}

/* The hardware ignores ECX for this leaf: traps on it are looked up (and counted) with
 * sub-leaf 0. Only the basic, hypervisor and extended ranges' first 256 leaves. */
XC_API int xc_set_ignores_ecx(struct xc_core *core, uint32_t leaf)
{
    int i;
    if (ecx_bitmap(leaf, &i) < 0)
        return -EINVAL;
    core->ignores_ecx[i][(leaf & 0xff) >> 3] |= (uint8_t)(1u << (leaf & 7));
    return 0;
}

XC_API int xc_put_answer(struct xc_core *core, uint32_t leaf, uint32_t subleaf,
                         const uint32_t regs[4])
{
    struct answer *a = answer_slot(core, (uint64_t)leaf << 32 | normalise(core, leaf, subleaf));
    if (!a)
        return -ENOMEM;
    memcpy(a->regs, regs, sizeof a->regs);
    a->has_flat = 1;
    return 0;
}

/* The answer on one CPU for a leaf whose answer depends on the CPU asking. */
XC_API int xc_put_cpu_answer(struct xc_core *core, int cpu, uint32_t leaf, uint32_t subleaf,
                             const uint32_t regs[4])
{
    if (cpu < 0 || cpu >= core->ncpus)
        return -EINVAL;
    struct answer *a = answer_slot(core, (uint64_t)leaf << 32 | normalise(core, leaf, subleaf));
    if (!a)
        return -ENOMEM;
    if (!a->per_cpu) {
        a->per_cpu = calloc((size_t)core->ncpus * 4, sizeof *a->per_cpu);
        a->cpu_known = calloc((size_t)core->ncpus, 1);
        if (!a->per_cpu || !a->cpu_known)
            return -ENOMEM;
    }
    memcpy(&a->per_cpu[cpu * 4], regs, 4 * sizeof *regs);
    a->cpu_known[cpu] = 1;
    a->uniform = -1;
    return 0;
}

/* ------------------------------------------------------------------ which CPU */

/* The CPU a stopped thread ran its CPUID on, without /proc:
 *  1. its rseq area (glibc 2.35+ registers one per thread): cpu_id is what the kernel
 *     stored on the thread's last return to user space, so exactly where CPUID ran;
 *  2. before registration (ld.so's own start-up CPUIDs) or without rseq: a thread
 *     allowed on one CPU only ran there;
 *  3. otherwise a CPU the thread may run on: the tracer's own if allowed (it was just
 *     woken by the stop), else the lowest allowed. Natively such a thread's answer is a
 *     snapshot too: it may migrate right after CPUID. */
static int thread_cpu(struct xc_core *core, struct tracee *t)
{
    if (t->rseq != RSEQ_KNOWN && t->rseq != RSEQ_UNSUPPORTED) {
        struct { uint64_t rseq_abi_pointer; uint32_t size, signature, flags, pad; } cfg;
        memset(&cfg, 0, sizeof cfg);
        long n = ptrace(XC_PTRACE_GET_RSEQ_CONFIGURATION, t->tid, (void *)sizeof cfg, &cfg);
        if (n < 0 && errno != ESRCH)
            t->rseq = RSEQ_UNSUPPORTED; /* kernel before 5.13 */
        else if (n > 0 && cfg.rseq_abi_pointer) {
            t->rseq = RSEQ_KNOWN;
            t->rseq_addr = cfg.rseq_abi_pointer;
        } /* else not registered yet: ask again next time */
    }
    if (t->rseq == RSEQ_KNOWN) {
        errno = 0;
        long word = ptrace(PTRACE_PEEKDATA, t->tid, (void *)t->rseq_addr, NULL);
        uint32_t cpu_id = (uint32_t)((uint64_t)word >> 32); /* struct rseq: cpu_id_start, cpu_id */
        if (!(word == -1 && errno) && cpu_id < (uint32_t)core->ncpus)
            return (int)cpu_id;
    }
    cpu_set_t allowed;
    if (sched_getaffinity(t->tid, sizeof allowed, &allowed))
        return -1;
    int me = sched_getcpu(), lowest = -1;
    for (int cpu = 0; cpu < core->ncpus; cpu++) {
        if (!CPU_ISSET(cpu, &allowed))
            continue;
        if (lowest < 0)
            lowest = cpu;
        if (CPU_COUNT(&allowed) == 1)
            return cpu;
    }
    return me >= 0 && me < CPU_SETSIZE && CPU_ISSET(me, &allowed) ? me : lowest;
}

/* A per-CPU entry's answer when every CPU Python probed gives the same one (leaf 4 on
 * most machines, everything on one CPU), else NULL. Computed once per entry. */
static const uint32_t *uniform_answer(const struct xc_core *core, struct answer *a)
{
    int first = -1;
    if (a->uniform < 0) {
        a->uniform = 0;
        for (int c = 0; c < core->ncpus; c++) {
            if (!a->cpu_known[c])
                continue;
            if (first < 0) {
                first = c;
                a->uniform = 1;
            } else if (memcmp(&a->per_cpu[c * 4], &a->per_cpu[first * 4], 16)) {
                a->uniform = 0;
                break;
            }
        }
    }
    if (a->uniform != 1)
        return NULL;
    for (int c = 0; c < core->ncpus; c++)
        if (a->cpu_known[c])
            return &a->per_cpu[c * 4];
    return NULL;
}

/* The answer for a trap, or NULL (none known: the trap goes up to Python). */
static const uint32_t *resolve(struct xc_core *core, struct tracee *t, struct answer *a, int *cpu)
{
    *cpu = -1;
    if (!a->per_cpu)
        return a->has_flat ? a->regs : NULL;
    const uint32_t *same = uniform_answer(core, a);
    if (same)
        return same;
    *cpu = thread_cpu(core, t);
    if (*cpu < 0 || *cpu >= core->ncpus || !a->cpu_known[*cpu])
        return NULL;
    return &a->per_cpu[*cpu * 4];
}

/* What the table says for (leaf, subleaf) on `cpu` (-1: a flat or all-CPU answer only),
 * after normalisation: 1 with `out` filled, or 0. For tests and Python's own lookups. */
XC_API int xc_lookup(struct xc_core *core, uint32_t leaf, uint32_t subleaf, int cpu,
                     uint32_t out[4])
{
    struct answer *a = answer_find(core, (uint64_t)leaf << 32 | normalise(core, leaf, subleaf));
    const uint32_t *regs = NULL;
    if (!a)
        return 0;
    if (!a->per_cpu)
        regs = a->has_flat ? a->regs : NULL;
    else if (cpu >= 0 && cpu < core->ncpus && a->cpu_known[cpu])
        regs = &a->per_cpu[cpu * 4];
    else
        regs = uniform_answer(core, a);
    if (!regs)
        return 0;
    memcpy(out, regs, 16);
    return 1;
}

/* For tests: the CPU the core would answer a stopped tracee's per-CPU leaf for. */
XC_API int xc_thread_cpu(struct xc_core *core, pid_t tid)
{
    struct tracee *t = tracee_find(core, tid);
    return t ? thread_cpu(core, t) : -ESRCH;
}

/* ------------------------------------------------------------------ tracees */

XC_API int xc_add_tracee(struct xc_core *core, pid_t tid, uint32_t flags)
{
    struct tracee *t = tracee_insert(core, tid, flags, T_RUNNING);
    if (!t)
        return -ENOMEM;
    t->flags = (uint8_t)flags;
    t->inherited = 1;
    return 0;
}

/* PTRACE_SEIZE with the core's options, then track it. 0 or -errno. */
XC_API int xc_seize(struct xc_core *core, pid_t tid, uint32_t flags)
{
    if (ptrace(PTRACE_SEIZE, tid, NULL, (void *)core->options))
        return -errno;
    return xc_add_tracee(core, tid, flags);
}

XC_API int xc_set_flags(struct xc_core *core, pid_t tid, uint32_t flags)
{
    struct tracee *t = tracee_find(core, tid);
    if (!t)
        return -ESRCH;
    t->flags = (uint8_t)flags;
    t->inherited = 1;
    return 0;
}

XC_API int xc_get_flags(struct xc_core *core, pid_t tid)
{
    struct tracee *t = tracee_find(core, tid);
    return t ? t->flags : -ESRCH;
}

XC_API void xc_forget(struct xc_core *core, pid_t tid) { tracee_delete(core, tid); }

XC_API int xc_tracee_count(struct xc_core *core) { return (int)core->tracee_len; }

XC_API size_t xc_take_events(struct xc_core *core, struct xc_event *out, size_t max)
{
    size_t n = core->event_len < max ? core->event_len : max;
    memcpy(out, core->events, n * sizeof *out);
    memmove(core->events, core->events + n, (core->event_len - n) * sizeof *out);
    core->event_len -= n;
    return n;
}

XC_API size_t xc_counts(struct xc_core *core, struct xc_count *out, size_t max)
{
    size_t n = 0;
    for (size_t i = 0; i < core->answer_cap; i++) {
        struct answer *a = &core->answers[i];
        if (!a->used || !a->traps)
            continue;
        if (n < max)
            out[n] = (struct xc_count){(uint32_t)(a->key >> 32), (uint32_t)a->key, a->traps};
        n++;
    }
    return n; /* may exceed max: call again with room for all */
}

XC_API void xc_stats(struct xc_core *core, struct xc_stats *out) { *out = core->stats; }

/* Async-signal-safe, and callable from another thread: run() returns XC_STOP_WOKEN at
 * once if it has not started, else after its next stop or timer tick. */
XC_API void xc_request_return(struct xc_core *core) { core->return_requested = 1; }

/* ------------------------------------------------------------------ the CPUID instruction */

static int legacy_prefix(uint8_t b)
{
    switch (b) {
    case 0x26: case 0x2e: case 0x36: case 0x3e: case 0x64: case 0x65:
    case 0x66: case 0x67: case 0xf2: case 0xf3:
        return 1;
    }
    return 0;
}

/* Length of a CPUID instruction at code[0..n): legacy prefixes and (64-bit code only) REX
 * prefixes in any order, as the CPU accepts them (a REX not right before the opcode is
 * ignored, not an error), then 0f a2; 15 bytes at most. 0: not CPUID; -1: n bytes are
 * all prefix, more are needed to tell. */
XC_API int xc_insn_length(const uint8_t *code, size_t n, int is64)
{
    size_t i = 0;
    while (i < n && i < 15 && (legacy_prefix(code[i]) || (is64 && (code[i] & 0xf0) == 0x40)))
        i++;
    if (i + 2 > 15)
        return 0;
    if (i + 2 > n)
        return n < 15 ? -1 : 0;
    return code[i] == 0x0f && code[i + 1] == 0xa2 ? (int)i + 2 : 0;
}

/* Bytes of the tracee's code from `at`: words read with PTRACE_PEEKTEXT (which, unlike
 * process_vm_readv, also reads execute-only pages). A word running into an unmapped page
 * fails with EIO; then the aligned word before the page end gives what there is. */
static int fetch_code(pid_t tid, uint64_t at, uint8_t *buf, int want)
{
    int n = 0;
    while (n < want) {
        errno = 0;
        long word = ptrace(PTRACE_PEEKTEXT, tid, (void *)(at + n), NULL);
        if (word == -1 && errno) {
            if (errno != EIO && errno != EFAULT)
                return -1;
            uint64_t aligned = (at + n) & ~7ULL, skip = at + n - aligned;
            errno = 0;
            word = ptrace(PTRACE_PEEKTEXT, tid, (void *)aligned, NULL);
            if (word == -1 && errno)
                return errno == EIO || errno == EFAULT ? n : -1;
            memcpy(buf + n, (uint8_t *)&word + skip, 8 - skip);
            return n + (int)(8 - skip);
        }
        memcpy(buf + n, &word, 8);
        n += 8;
    }
    return n;
}

/* ------------------------------------------------------------------ stop handlers */

/* A failed ptrace call on a stopped thread: ESRCH means it was killed meanwhile (its
 * exit report follows), which is normal; anything else goes up with errno. */
static int failed(struct xc_core *core, struct xc_stop *out)
{
    if (errno == ESRCH) {
        core->stats.vanished++;
        return XC_HANDLED;
    }
    out->err = errno;
    return XC_STOP_ERROR;
}

static int resume(struct xc_core *core, pid_t tid, struct xc_stop *out)
{
    return ptrace(PTRACE_CONT, tid, NULL, NULL) ? failed(core, out) : XC_HANDLED;
}

static int on_sigsegv(struct xc_core *core, struct tracee *t, struct xc_stop *out)
{
    siginfo_t info;
    struct user_regs_struct regs;
    pid_t tid = t->tid;
    if (ptrace(PTRACE_GETSIGINFO, tid, NULL, &info))
        return failed(core, out);
    if (info.si_code != SI_KERNEL || info.si_addr != NULL)
        return XC_STOP_STATUS; /* a genuine SIGSEGV: Python delivers it */
    if (ptrace(PTRACE_GETREGS, tid, NULL, &regs))
        return failed(core, out);
    int is64 = regs.cs != XC_USER32_CS;
    uint8_t code[16];
    int have = fetch_code(tid, regs.rip, code, 8);
    if (have < 0)
        return failed(core, out);
    int len = xc_insn_length(code, (size_t)have, is64);
    if (len < 0 && have == 8) {
        have = fetch_code(tid, regs.rip, code, 16);
        if (have < 0)
            return failed(core, out);
        len = xc_insn_length(code, (size_t)have, is64);
    }
    if (len <= 0)
        return XC_STOP_STATUS; /* not a CPUID: deliver */
    uint32_t leaf = (uint32_t)regs.rax, subleaf = normalise(core, leaf, (uint32_t)regs.rcx);
    out->leaf = t->trap_leaf = leaf;
    out->subleaf = t->trap_subleaf = subleaf;
    out->insn_len = t->trap_len = (uint8_t)len;
    out->cpu = -1;
    if (!(t->flags & XC_ANSWER))
        return XC_STOP_CPUID;
    struct answer *a = answer_find(core, (uint64_t)leaf << 32 | subleaf);
    const uint32_t *answer = a ? resolve(core, t, a, &out->cpu) : NULL;
    if (!answer)
        return XC_STOP_CPUID;
    /* CPUID writes EAX..EDX, zero-extending into RAX..RDX in 64-bit mode */
    regs.rax = answer[0];
    regs.rbx = answer[1];
    regs.rcx = answer[2];
    regs.rdx = answer[3];
    regs.rip += (unsigned)len;
    if (ptrace(PTRACE_SETREGS, tid, NULL, &regs) || ptrace(PTRACE_CONT, tid, NULL, NULL))
        return failed(core, out);
    a->traps++;
    core->stats.answered++;
    return XC_HANDLED;
}

/* Python answers a trap that went up as XC_STOP_CPUID: write `regs`, step over the
 * instruction, count it, resume. 0 or -errno. */
XC_API int xc_complete_cpuid(struct xc_core *core, pid_t tid, const uint32_t answer[4])
{
    struct tracee *t = tracee_find(core, tid);
    struct user_regs_struct regs;
    if (!t || !t->trap_len)
        return -EINVAL;
    if (ptrace(PTRACE_GETREGS, tid, NULL, &regs))
        return -errno;
    regs.rax = answer[0];
    regs.rbx = answer[1];
    regs.rcx = answer[2];
    regs.rdx = answer[3];
    regs.rip += t->trap_len;
    t->trap_len = 0;
    if (ptrace(PTRACE_SETREGS, tid, NULL, &regs) || ptrace(PTRACE_CONT, tid, NULL, NULL))
        return -errno;
    struct answer *a = answer_slot(core, (uint64_t)t->trap_leaf << 32 | t->trap_subleaf);
    if (a)
        a->traps++;
    core->stats.answered++;
    return 0;
}

/* clone(2) and clone3(2) say in their flags whether the child is a thread; the parent's
 * registers at the clone event still hold the system call's arguments. */
static int clone_is_thread(pid_t parent)
{
    struct user_regs_struct regs;
    if (ptrace(PTRACE_GETREGS, parent, NULL, &regs))
        return -1;
    int is64 = regs.cs != XC_USER32_CS;
    uint64_t arg0 = is64 ? regs.rdi : (uint32_t)regs.rbx;
    if (regs.orig_rax == (is64 ? XC_SYS_CLONE_64 : XC_SYS_CLONE_32))
        return !!(arg0 & XC_CLONE_THREAD);
    if (regs.orig_rax == XC_SYS_CLONE3) { /* struct clone_args starts with u64 flags */
        errno = 0;
        long flags = ptrace(PTRACE_PEEKDATA, parent, (void *)arg0, NULL);
        if (flags == -1 && errno)
            return -1;
        return !!((uint64_t)flags & XC_CLONE_THREAD);
    }
    return -1;
}

static int on_new_child(struct xc_core *core, pid_t parent, int event, struct xc_stop *out)
{
    unsigned long msg;
    if (ptrace(PTRACE_GETEVENTMSG, parent, NULL, &msg))
        return failed(core, out);
    pid_t child = (pid_t)msg;
    int kind = event == PTRACE_EVENT_FORK ? XC_EV_FORK : event == PTRACE_EVENT_VFORK ? XC_EV_VFORK
                                                                                   : 0;
    if (!kind) {
        int thread = clone_is_thread(parent);
        if (thread < 0 && errno == ESRCH)
            return failed(core, out);
        kind = thread > 0 ? XC_EV_CLONE_THREAD : XC_EV_CLONE_PROCESS;
    }
    uint8_t flags = tracee_find(core, parent)->flags;
    /* The child's first stop may have come first; then it got the default flags. */
    struct tracee *c = tracee_insert(core, child, flags, T_NEW);
    if (!c || push_event(core, (struct xc_event){kind, parent, child, 0, 0, 0})) {
        out->err = ENOMEM;
        return XC_STOP_ERROR;
    }
    c->flags = flags;
    c->inherited = 1;
    if (c->state == T_HELD) { /* its first stop came first: it may run now */
        c->state = T_RUNNING;
        if (ptrace(PTRACE_CONT, child, NULL, NULL) && errno != ESRCH)
            return failed(core, out);
    }
    return resume(core, parent, out);
}

/* Re-arming after exec in two stops. At the exec event the new image is loaded and its
 * first instruction has not run, but the tracee is still inside execve: registers set
 * now survive, except RAX, which execve's return overwrites with 0 (why an injected
 * system call set up by registers alone does nothing there). So one word of code goes at
 * RIP (rounded down to 8 bytes, never crossing a page):
 *     mov eax, NR ; syscall (int 0x80 in 32-bit code) ; int3
 * with the arguments in registers. The int3's SIGTRAP stop reads the result; the next
 * call reuses the word; after the last the word and the registers go back. */
static const uint8_t ARM_CODE_64[8] = {0xb8, 0x9e, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xcc};
static const uint8_t ARM_CODE_32[8] = {0xb8, 0x80, 0x01, 0x00, 0x00, 0xcd, 0x80, 0xcc};

static void set_call_args(struct user_regs_struct *regs, const struct exec_call *call)
{
    if (regs->cs == XC_USER32_CS) {
        regs->rbx = (uint32_t)call->code;
        regs->rcx = (uint32_t)call->arg;
    } else {
        regs->rdi = call->code;
        regs->rsi = call->arg;
    }
}

static int on_exec(struct xc_core *core, pid_t tid, struct xc_stop *out)
{
    unsigned long former;
    if (ptrace(PTRACE_GETEVENTMSG, tid, NULL, &former))
        return failed(core, out);
    if ((pid_t)former != tid) {
        /* A non-leader thread exec'd and took over the leader's tid: its own is gone. */
        struct tracee *f = tracee_find(core, (pid_t)former);
        if (f) {
            uint8_t flags = f->flags;
            tracee_delete(core, (pid_t)former);
            tracee_find(core, tid)->flags = flags;
        }
    }
    struct tracee *t = tracee_find(core, tid);
    t->rseq = RSEQ_UNKNOWN; /* a new image registers its own */
    if (push_event(core, (struct xc_event){XC_EV_EXEC, tid, (int32_t)former, 0, 0, 0})) {
        out->err = ENOMEM;
        return XC_STOP_ERROR;
    }
    if (core->ncalls) {
        struct user_regs_struct regs;
        if (!t->saved && !(t->saved = malloc(sizeof *t->saved))) {
            out->err = ENOMEM;
            return XC_STOP_ERROR;
        }
        if (ptrace(PTRACE_GETREGS, tid, NULL, &regs))
            return failed(core, out);
        t->code_at = regs.rip & ~7ULL;
        errno = 0;
        long word = ptrace(PTRACE_PEEKTEXT, tid, (void *)t->code_at, NULL);
        if (word == -1 && errno)
            return failed(core, out);
        *t->saved = regs;
        t->saved->rax = 0;              /* what execve returns */
        t->saved->orig_rax = (uint64_t)-1; /* not in a system call once restored */
        t->saved_word = (uint64_t)word;
        uint64_t arm;
        memcpy(&arm, regs.cs == XC_USER32_CS ? ARM_CODE_32 : ARM_CODE_64, 8);
        regs.rip = t->code_at;
        set_call_args(&regs, &core->calls[0]);
        if (ptrace(PTRACE_POKETEXT, tid, (void *)t->code_at, (void *)arm) ||
            ptrace(PTRACE_SETREGS, tid, NULL, &regs))
            return failed(core, out);
        t->state = T_ARMING;
        t->call = 0;
    }
    if (core->stop_at_exec)
        return XC_STOP_EXEC;
    return resume(core, tid, out);
}

static int restore_image(struct tracee *t)
{
    if (ptrace(PTRACE_POKETEXT, t->tid, (void *)t->code_at, (void *)t->saved_word) ||
        ptrace(PTRACE_SETREGS, t->tid, NULL, t->saved))
        return -1;
    t->state = T_RUNNING;
    return 0;
}

static int on_arm_trap(struct xc_core *core, struct tracee *t, struct xc_stop *out)
{
    struct user_regs_struct regs;
    if (ptrace(PTRACE_GETREGS, t->tid, NULL, &regs))
        return failed(core, out);
    if (regs.rip != t->code_at + 8)
        return XC_STOP_STATUS; /* a SIGTRAP that is not our int3 */
    int64_t result = regs.cs == XC_USER32_CS ? (int32_t)regs.rax : (int64_t)regs.rax;
    const struct exec_call *call = &core->calls[t->call];
    if (result < 0) { /* -errno; ARCH_GET_* calls return a value */
        if (call->required) {
            out->result = result;
            out->code = call->code;
            return restore_image(t) ? failed(core, out) : XC_STOP_ARM_FAILED;
        }
        struct xc_event ev = {XC_EV_CALL_FAILED, t->tid, 0, 0, call->code, result};
        if (push_event(core, ev)) {
            out->err = ENOMEM;
            return XC_STOP_ERROR;
        }
    }
    if (++t->call < core->ncalls) {
        regs.rip = t->code_at;
        set_call_args(&regs, &core->calls[t->call]);
        if (ptrace(PTRACE_SETREGS, t->tid, NULL, &regs))
            return failed(core, out);
        return resume(core, t->tid, out);
    }
    if (restore_image(t))
        return failed(core, out);
    core->stats.arms++;
    return resume(core, t->tid, out);
}

static int handle(struct xc_core *core, pid_t tid, int status, struct xc_stop *out)
{
    memset(out, 0, sizeof *out);
    out->tid = tid;
    out->status = status;
    out->cpu = -1;
    core->stats.stops++;
    struct tracee *t = tracee_find(core, tid);
    if (!WIFSTOPPED(status)) {
        tracee_delete(core, tid);
        return XC_STOP_STATUS;
    }
    if (!t && !(t = tracee_insert(core, tid, core->default_flags, T_NEW))) {
        out->err = ENOMEM; /* a new child whose parent's event is still to come */
        return XC_STOP_ERROR;
    }
    int sig = WSTOPSIG(status), event = (status >> 16) & 0xff;
    switch (event) {
    case 0:
        if (sig == SIGSEGV && t->state != T_NEW)
            return on_sigsegv(core, t, out);
        if (sig == SIGTRAP && t->state == T_ARMING)
            return on_arm_trap(core, t, out);
        return XC_STOP_STATUS;
    case PTRACE_EVENT_FORK:
    case PTRACE_EVENT_VFORK:
    case PTRACE_EVENT_CLONE:
        return on_new_child(core, tid, event, out);
    case PTRACE_EVENT_EXEC:
        return on_exec(core, tid, out);
    case PTRACE_EVENT_STOP:
        if (t->state == T_NEW) { /* an auto-attached child's first stop */
            if (!t->inherited) {
                t->state = T_HELD; /* its parent's event is still to come */
                return XC_HANDLED;
            }
            t->state = T_RUNNING;
            return resume(core, tid, out);
        }
        return XC_STOP_STATUS;
    case PTRACE_EVENT_SECCOMP:
        if (t->state == T_ARMING) /* our own arch_prctl, met by the program's filter */
            return resume(core, tid, out);
        return XC_STOP_STATUS;
    default:
        return XC_STOP_STATUS;
    }
}

/* ------------------------------------------------------------------ the loop */

struct kernel_itimerspec {
    struct timespec it_interval, it_value;
};

/* A per-thread POSIX timer sending wake_signal to the thread in run(): it fires after
 * timeout_ms, then every 2 ms until disarmed, so a tick that lands between the flag check
 * and waitpid is followed by another that interrupts waitpid. */
static int arm_timer(struct xc_core *core, int timeout_ms)
{
    pid_t self = (pid_t)syscall(SYS_gettid);
    if (core->timer_id >= 0 && core->timer_tid != self) {
        syscall(SYS_timer_delete, core->timer_id);
        core->timer_id = -1;
    }
    if (core->timer_id < 0) {
        struct sigevent sev;
        int id;
        memset(&sev, 0, sizeof sev);
        sev.sigev_notify = SIGEV_THREAD_ID;
        sev.sigev_signo = core->wake_signal;
        sev.sigev_value.sival_ptr = core;
        sev._sigev_un._tid = self;
        if (syscall(SYS_timer_create, CLOCK_MONOTONIC, &sev, &id))
            return -1;
        core->timer_id = id;
        core->timer_tid = self;
    }
    struct kernel_itimerspec its = {
        {0, 2000000},
        {timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000000 + (timeout_ms ? 0 : 1)},
    };
    return (int)syscall(SYS_timer_settime, core->timer_id, 0, &its, NULL);
}

static void disarm_timer(struct xc_core *core)
{
    struct kernel_itimerspec off;
    memset(&off, 0, sizeof off);
    syscall(SYS_timer_settime, core->timer_id, 0, &off, NULL);
}

/* Wait for stops and deal with those the core handles; return at the first one it does
 * not (see enum xc_reason), when there are no tracees, or after timeout_ms (needs a
 * wake_signal; -1: no timeout). Fills *out; returns out->reason. */
XC_API int xc_run(struct xc_core *core, int timeout_ms, struct xc_stop *out)
{
    int reason;
    int timed = timeout_ms >= 0;
    memset(out, 0, sizeof *out);
    core->timer_fired = 0; /* a tick of the previous call, after its last check */
    if (timed && (!core->wake_signal || arm_timer(core, timeout_ms))) {
        out->err = core->wake_signal ? errno : EINVAL;
        out->reason = XC_STOP_ERROR;
        return XC_STOP_ERROR;
    }
    for (;;) {
        if (core->timer_fired || core->return_requested) {
            reason = XC_STOP_WOKEN;
            break;
        }
        if (!core->queue_len) {
            int status;
            pid_t tid = waitpid(-1, &status, __WALL);
            if (tid < 0) {
                memset(out, 0, sizeof *out);
                if (errno == EINTR)
                    reason = core->timer_fired || core->return_requested ? XC_STOP_WOKEN
                                                                         : XC_STOP_EINTR;
                else if (errno == ECHILD)
                    reason = XC_STOP_NO_TRACEES;
                else {
                    out->err = errno;
                    reason = XC_STOP_ERROR;
                }
                break;
            }
            while (tid > 0) {
                if (queue_push(core, tid, status)) {
                    out->err = ENOMEM;
                    reason = XC_STOP_ERROR;
                    goto done;
                }
                tid = waitpid(-1, &status, __WALL | WNOHANG);
            }
        }
        struct pending next = core->queue[core->queue_head];
        core->queue_head++;
        if (!--core->queue_len)
            core->queue_head = 0;
        reason = handle(core, next.tid, next.status, out);
        if (reason != XC_HANDLED)
            break;
    }
done:
    if (timed)
        disarm_timer(core);
    if (reason == XC_STOP_WOKEN)
        core->return_requested = 0;
    core->stats.returned++;
    out->reason = reason;
    return reason;
}
