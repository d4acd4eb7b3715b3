// The table cache (patch_tables.h): a map from key to tables with least-recently-used eviction.
#include "patch_tables.h"

#include <list>
#include <map>
#include <mutex>

namespace comm_fast {
namespace {

// Enough for every grid of a run and a few hundred image sizes (an entry is a few KB to ~30 KB).
// A CUDA graph keeps pointers into the entries it captured: capturing more than this many other
// shapes while a graph is alive would invalidate it.
constexpr size_t kMaxTableEntries = 1024;

struct Cache {
  std::mutex mutex;
  std::list<TableKey> order;  // most recent first
  std::map<TableKey, std::pair<std::shared_ptr<Tables>, std::list<TableKey>::iterator>> entries;
  TableCacheStats stats;
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: device copies must not be freed after CUDA shuts down
  return *c;
}

}  // namespace

std::shared_ptr<Tables> cached_tables(const TableKey& key, const std::function<Tables()>& build) {
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    auto it = c.entries.find(key);
    if (it != c.entries.end()) {
      c.order.splice(c.order.begin(), c.order, it->second.second);
      ++c.stats.hits;
      return it->second.first;
    }
  }
  auto tables = std::make_shared<Tables>(build());  // built outside the lock
  std::lock_guard<std::mutex> lock(c.mutex);
  auto it = c.entries.find(key);
  if (it != c.entries.end()) {  // another thread built it meanwhile
    ++c.stats.hits;
    return it->second.first;
  }
  ++c.stats.builds;
  c.order.push_front(key);
  c.entries.emplace(key, std::make_pair(tables, c.order.begin()));
  while (c.entries.size() > kMaxTableEntries) {
    c.entries.erase(c.order.back());
    c.order.pop_back();
  }
  return tables;
}

TableCacheStats table_cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  TableCacheStats s = c.stats;
  s.entries = static_cast<int64_t>(c.entries.size());
  return s;
}

void table_cache_clear() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.entries.clear();
  c.order.clear();
  c.stats = TableCacheStats{};
}

}  // namespace comm_fast
