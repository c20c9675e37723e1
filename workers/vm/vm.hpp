#pragma once
// The `vm` service (namespace /vm): launches VMs — long tasks that report
// progress to the asking socket and end with a result. Simulated, with a
// configurable launch time and failure rate; the shape is what matters:
// ack at once, progress events, a final vm_response, cancellation, failures
// reported rather than swallowed.
//
//   open_vm {count, name} (ack)  -> ack {task_id}
//     vm_progress {task_id, vm, state, percent}   state: queued, provisioning,
//                                                  booting, running, failed, cancelled
//     vm_response {task_id, data: [{vm, state, ip?}], failed, cancelled, worker}
//   cancel_vm {task_id} (ack)   -> ack {task_id, cancelled: true|false}
#include <chrono>

#include "workers/sdk/worker.hpp"

namespace sidecast::workers {

struct vm_options {
  std::chrono::milliseconds launch_time{4000};  // queued -> running for one VM
  double failure_rate = 0.1;                    // chance that a VM fails
  unsigned max_count = 20;                      // VMs per open_vm
};

service vm_service(unsigned capacity, vm_options options);

}  // namespace sidecast::workers
