// Peak multiply-accumulate rate of one core: fp32 FMA (AVX-512) and int8 dot products (AVX-512 VNNI).
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define N 12
int main(void){
  long iters=200000000/N;
  __m512 a[N]; __m512 b=_mm512_set1_ps(1.0000001f), c=_mm512_set1_ps(1e-7f);
  for(int i=0;i<N;i++) a[i]=_mm512_set1_ps((float)i);
  double t=now();
  for(long k=0;k<iters;k++){
    #pragma GCC unroll 12
    for(int i=0;i<N;i++) a[i]=_mm512_fmadd_ps(a[i],b,c);
  }
  t=now()-t; float s=0; for(int i=0;i<N;i++) s+=_mm512_reduce_add_ps(a[i]);
  double fp=iters*(double)N*16/t;
  __m512i acc[N]; __m512i u=_mm512_set1_epi8(3), v=_mm512_set1_epi8(-2);
  for(int i=0;i<N;i++) acc[i]=_mm512_set1_epi32(i);
  t=now();
  for(long k=0;k<iters;k++){
    #pragma GCC unroll 12
    for(int i=0;i<N;i++) acc[i]=_mm512_dpbusd_epi32(acc[i],u,v);
  }
  t=now()-t; long si=0; for(int i=0;i<N;i++) si+=_mm512_reduce_add_epi32(acc[i]);
  double in=iters*(double)N*64/t;
  printf("{\"fp32_gmac_s\": %.1f, \"int8_gmac_s\": %.1f, \"check\": %g}\n", fp/1e9, in/1e9, (double)s+si);
  return 0;
}
