#include <immintrin.h>
#if VEC == 512
typedef __m512d vec;
#define ADD _mm512_add_pd
#define SET1 _mm512_set1_pd
#define LANES 8
#elif VEC == 128
typedef __m128d vec;
#define ADD _mm_add_pd
#define SET1 _mm_set1_pd
#define LANES 2
#else
typedef __m256d vec;
#define ADD _mm256_add_pd
#define SET1 _mm256_set1_pd
#define LANES 4
#endif
#define R10(M, b) M(b##0) M(b##1) M(b##2) M(b##3) M(b##4) M(b##5) M(b##6) M(b##7) M(b##8) M(b##9)
#define R100(M, b)                                                                         \
    R10(M, b##0) R10(M, b##1) R10(M, b##2) R10(M, b##3) R10(M, b##4) R10(M, b##5)          \
        R10(M, b##6) R10(M, b##7) R10(M, b##8) R10(M, b##9)
#define R400(M) R100(M, 0) R100(M, 1) R100(M, 2) R100(M, 3)
