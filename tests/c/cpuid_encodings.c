/* Runs CPUID through encodings a supervisor must recognise, and prints each answer:
 *   cpuid_encodings [--too-long]
 * One line per encoding, "enc NAME a=.. b=.. c=.. d=..", for leaf 7 sub-leaf 0, then
 * leaf 1 asked with garbage in ECX (its EBX, which holds the APIC ID, is left out).
 * Prefixed encodings, and CPUIDs that end right before an unmapped page, where reading 8
 * bytes at RIP fails. --too-long runs a 16-byte encoding, which raises #GP (SIGSEGV)
 * natively too. */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define ENC(name, bytes, leaf, sub)                                                        \
    do {                                                                                   \
        unsigned a = (leaf), b, c = (sub), d;                                              \
        __asm__ volatile(".byte " bytes : "+a"(a), "=b"(b), "+c"(c), "=d"(d));              \
        report(name, a, b, c, d);                                                          \
    } while (0)

static void report(const char *name, unsigned a, unsigned b, unsigned c, unsigned d)
{
    printf("enc %s a=%#x b=%#x c=%#x d=%#x\n", name, a, b, c, d);
}

/* A page ending in: ret; PREFIXES; 0f a2; jmp back to the ret. Returns the CPUID's
 * address, callable as a function; the page after it is unmapped. */
static void *page_end_cpuid(const unsigned char *prefixes, int n)
{
    unsigned char *p = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    munmap(p + 4096, 4096);
    unsigned char *end = p + 4096, *ret = end - (n + 5);
    ret[0] = 0xc3;
    memcpy(ret + 1, prefixes, n);
    memcpy(ret + 1 + n, "\x0f\xa2\xeb", 3);
    end[-1] = (unsigned char)-(n + 5); /* rel8 from the page end back to the ret */
    mprotect(p, 4096, PROT_READ | PROT_EXEC);
    return ret + 1;
}

static void call_cpuid_at(const char *name, void *code, unsigned leaf)
{
    unsigned a = leaf, b, c = 0, d;
    /* skip the red zone: the call pushes a return address */
    __asm__ volatile("sub $128, %%rsp\n\tcall *%4\n\tadd $128, %%rsp"
                     : "+a"(a), "=b"(b), "+c"(c), "=d"(d)
                     : "r"(code)
                     : "memory");
    report(name, a, b, c, d);
}

int main(int argc, char **argv)
{
    ENC("plain", "0x0f,0xa2", 7, 0);
    ENC("66", "0x66,0x0f,0xa2", 7, 0);
    ENC("f3-rex.w", "0xf3,0x48,0x0f,0xa2", 7, 0);
    ENC("rex-then-66", "0x48,0x66,0x0f,0xa2", 7, 0);
    ENC("segments", "0x2e,0x3e,0x26,0x36,0x64,0x65,0x67,0xf2,0x0f,0xa2", 7, 0);
    ENC("15-bytes", "0x66,0x66,0x66,0x66,0x66,0x66,0x66,0x66,0x66,0x66,0x66,0x66,0x66,0x0f,0xa2",
        7, 0);
    call_cpuid_at("page-end", page_end_cpuid(NULL, 0), 7);
    call_cpuid_at("page-end-66", page_end_cpuid((const unsigned char *)"\x66", 1), 7);
    {
        unsigned a = 1, b, c = 0xdeadbeef, d;
        __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
        printf("enc leaf1-garbage-ecx c=%#x d=%#x\n", c, d);
    }
    fflush(stdout);
    if (argc > 1 && strcmp(argv[1], "--too-long") == 0)
        ENC("16-bytes",
            "0x66,0x66,0x66,0x66,0x66,0x66,0x66,0x66,0x66,0x66,0x66,0x66,0x66,0x66,0x0f,0xa2", 7,
            0);
    return 0;
}
