# Tidies the mdoc page ArgumentParser's generate-manual writes:
# - it lists hidden subcommands too: the internal __serve item is removed, from ".It Em __serve" up
#   to the next item of the same list (or the end of that list);
# - paragraphs of a command's discussion are separated by empty lines, which mdoc does not allow:
#   they become .Pp.
/^\.It Em __serve$/ { skipping = 1; depth = 0; next }
skipping && /^\.Bl/ { depth++ }
skipping && /^\.El/ { if (depth == 0) { skipping = 0 } else { depth--; next } }
skipping && depth == 0 && /^\.It / { skipping = 0 }
skipping { next }
/^$/ { print ".Pp"; next }
{ print }
