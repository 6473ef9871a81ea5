// The trace-pass tasks for x86-64 CPUs with AVX2 and FMA, selected at run time.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma")
#define BP_CPU_ISA isa_avx2
#define BP_VECTOR_BYTES 32
#include "trace_tasks.h"
#include "sequence_tasks.h"
#endif
