// The table cache of the patch ops: tap tables, Pillow coefficients and normalisation lookups are
// built once per key (what they are for, which sizes / mode / constants, which device) and reused,
// so that no op call rebuilds or re-uploads them (CUDA: no pageable copy, no stream sync per call).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>

#include "patch_common.h"

namespace comm_fast {

// key[0]: Tables::Kind, key[1]: device type (-1 CPU, else c10::DeviceType), key[2]: device index,
// then the kind's parameters (sizes, mode, scale factors / constants as their bits); unused zero.
using TableKey = std::array<int64_t, 16>;

// The tables for key, built by `build` on a miss. Least recently used entries beyond a bound are
// dropped (see kMaxTableEntries in patch_tables.cpp).
std::shared_ptr<Tables> cached_tables(const TableKey& key, const std::function<Tables()>& build);

struct TableCacheStats {
  int64_t builds = 0, hits = 0, entries = 0;
};
TableCacheStats table_cache_stats();
void table_cache_clear();

inline int64_t bits_of(double v) {
  int64_t b;
  static_assert(sizeof b == sizeof v, "double is 64 bits");
  std::memcpy(&b, &v, sizeof b);
  return b;
}

}  // namespace comm_fast
