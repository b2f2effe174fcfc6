def write_recipe_report(res, p, report):
    raise NotImplementedError
