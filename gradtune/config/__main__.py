from gradtune.config.table import markdown_table

print(markdown_table())
