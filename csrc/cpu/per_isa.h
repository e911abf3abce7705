// Compiles the body file named by MK_ISA_BODY once per ISA, each copy in its
// ISA's namespace (isa_avx512, isa_avx2) under that ISA's target pragma
// (simd.h), so a kernel body is written once against `Vec`. No include
// guard: each user includes it once per body,
//   #define MK_ISA_BODY "few_rows_body.inc"
//   #include "per_isa.h"
// and the file undefines MK_ISA_BODY after use.
#ifdef MK_HAVE_SIMD_VEC
MK_BEGIN_AVX512
namespace isa_avx512 {
#include MK_ISA_BODY
}  // namespace isa_avx512
MK_END_ISA

MK_BEGIN_AVX2
namespace isa_avx2 {
#include MK_ISA_BODY
}  // namespace isa_avx2
MK_END_ISA
#endif
#undef MK_ISA_BODY
