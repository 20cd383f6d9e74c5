/* 400 functions taking eight vector arguments, bound lazily by the caller (lazymain.c).
 * Every first call goes through glibc's _dl_runtime_resolve, which must preserve the
 * vector argument registers: it sizes its XSAVEC area from CPUID leaf 0xD. */
#include "lazy.h"
#define DEF(n)                                                                             \
    vec f##n(vec a, vec b, vec c, vec d, vec e, vec f, vec g, vec h)                        \
    {                                                                                      \
        return ADD(ADD(ADD(a, b), ADD(c, d)), ADD(ADD(e, f), ADD(g, h)));                   \
    }
R400(DEF)
