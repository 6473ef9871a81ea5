// The trace-pass tasks for x86-64 CPUs with AVX-512 (F, VL, BW, DQ), selected at run time.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#define BP_CPU_ISA isa_avx512
#define BP_VECTOR_BYTES 64
#include "trace_tasks.h"
#include "sequence_tasks.h"
#endif
