// tropd/policies.hpp: umbrella of the TROPD_HD maths only (no Eigen, no threads): the core
// types and rules, the estimators, the policies and the objective. For .cu files and for
// bindings that forward to a backend of their own.
#pragma once

#include <tropd/aggregation/aggregation.hpp>
#include <tropd/clippers/clippers.hpp>
#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/random.hpp>
#include <tropd/core/sparse_terms.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/token.hpp>
#include <tropd/core/token_batch.hpp>
#include <tropd/core/token_rules.hpp>
#include <tropd/core/types.hpp>
#include <tropd/core/values.hpp>
#include <tropd/core/views.hpp>
#include <tropd/estimators/full_vocab.hpp>
#include <tropd/estimators/rewards.hpp>
#include <tropd/estimators/row_moments.hpp>
#include <tropd/estimators/sampled.hpp>
#include <tropd/estimators/topk.hpp>
#include <tropd/objective.hpp>
#include <tropd/outliers/outliers.hpp>
#include <tropd/regions/regions.hpp>
