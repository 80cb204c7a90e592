"""Find sites: the nodes that can take a branch, their module paths, target selection, folded weights."""
