// Moved to core/rows.hpp (row helpers serve attention and the KV layouts alike); kept so that
// existing includes keep working.
#pragma once
#include "../core/rows.hpp"
