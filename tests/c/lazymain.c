/* Calls each of the 400 lazily bound functions of lazylib.c once with live vector
 * arguments and checks every lane of every result. Prints "lazy ok N" or the first
 * mismatch; exits 0 only if all are right. */
#include <stdio.h>
#include "lazy.h"
#define DECL(n) vec f##n(vec, vec, vec, vec, vec, vec, vec, vec);
R400(DECL)

static int checked, bad;

static void check(vec got, double k)
{
    double lanes[LANES];
    double want = 8 * k + 28; /* k + (k+1) + ... + (k+7) */
    __builtin_memcpy(lanes, &got, sizeof lanes);
    for (int i = 0; i < LANES; i++)
        if (lanes[i] != want && !bad++)
            printf("lazy mismatch at call %d lane %d: %g != %g\n", checked, i, lanes[i], want);
    checked++;
}

#define CALL(n)                                                                            \
    k += 1;                                                                                \
    check(f##n(SET1(k), SET1(k + 1), SET1(k + 2), SET1(k + 3), SET1(k + 4), SET1(k + 5),   \
               SET1(k + 6), SET1(k + 7)),                                                  \
          k);

int main(void)
{
    double k = 0;
    R400(CALL)
    printf("lazy %s %d\n", bad ? "bad" : "ok", checked);
    return bad != 0;
}
