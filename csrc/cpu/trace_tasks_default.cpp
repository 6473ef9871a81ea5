// The trace-pass tasks for the compiler's baseline instruction set (any CPU).
#define BP_CPU_ISA isa_default
#define BP_VECTOR_BYTES 16
#include "trace_tasks.h"
#include "sequence_tasks.h"
