// tropd/tropd.hpp: umbrella header for host code.
#pragma once

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/random.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/types.hpp>
#include <tropd/core/views.hpp>
#include <tropd/estimators/full_vocab.hpp>
#include <tropd/estimators/sampled.hpp>
#include <tropd/estimators/topk.hpp>
#include <tropd/host/rows.hpp>
#include <tropd/host/objective.hpp>
#include <tropd/objective.hpp>
